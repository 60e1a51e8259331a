"""The training state and step: Optax AdamW with warmup + cosine, clipping, gradient accumulation, sharded jit.

The step is generic in its loss: `loss_fn(model, batch, rng) -> (loss, metrics)` sees the student as an NNX
module (the one decoder) and a batch dict whose arrays have the global batch as leading dimension. Distillation,
cross-entropy-only and QAT runs differ only in the loss they pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from distill.sharding import param_name, param_spec, replicated, step_batch_sharding
from nano.config import ModelConfig
from nano.model import Decoder
from nano.quant_scheme import QuantSpec
from nano.quant import fake_quantize

LossFn = Callable[[Decoder, dict, jax.Array], tuple[jax.Array, dict]]
ParamTransform = Callable[[nnx.State], nnx.State]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 1000
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.final_lr_fraction)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    # No weight decay on norm scales: decaying a multiplier initialised at 1 pulls it towards 0.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not param_name(path).endswith(".scale"), params)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState
    rng: jax.Array


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
    """Parameters (and their optimizer moments, which share their shapes and paths) by the partition rules."""

    def leaf(path, x):
        name = param_name(path)
        for marker in ("params.", "mu.", "nu."):  # Adam's moments carry their parameter's path after mu./nu.
            if marker in name:
                return NamedSharding(mesh, param_spec(name.split(marker, 1)[1], x.shape, mesh))
        return replicated(mesh)  # step, RNG, counts

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def model_graphdef(config: ModelConfig):
    """The student's NNX graph definition (structure without arrays): nnx.merge(it, params) is the model."""
    return nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))


def _state_factory(config: ModelConfig, optimizer: optax.GradientTransformation):
    """create(key, params) -> TrainState: the random initialisation (or `params`, when given) and its optimizer
    state at step 0."""
    def create(key, given=None):
        model = Decoder(config, rngs=nnx.Rngs(key))
        model_params = nnx.state(model, nnx.Param) if given is None else given
        return TrainState(step=jnp.zeros((), jnp.int32), params=model_params,
                          opt_state=optimizer.init(model_params), rng=jax.random.fold_in(key, 1))

    return create


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState's shapes and dtypes, nothing allocated."""
    return jax.eval_shape(_state_factory(config, optimizer), jax.random.PRNGKey(0))


def init_state(config: ModelConfig, optimizer: optax.GradientTransformation, *, seed: int, mesh: Mesh,
               params: nnx.State | None = None):
    """(graphdef, TrainState) created already sharded: no device ever holds the whole unsharded model.

    `params` (e.g. layers kept from the teacher) replace the random initialisation.
    """
    create = _state_factory(config, optimizer)
    graphdef = model_graphdef(config)
    key = jax.random.PRNGKey(seed)  # a raw uint32 key: checkpoints store it like any array
    shardings = state_shardings(jax.eval_shape(create, key, params), mesh)
    # `params` go in as an argument: a closure would bake them into the program as constants.
    return graphdef, jax.jit(create, out_shardings=shardings)(key, params)


def fake_quantizer(specs: dict[str, QuantSpec]) -> ParamTransform:
    """QAT's view of the parameters: those named in `specs` rounded onto their int grid in the forward pass, with
    straight-through gradients to the float masters (which the optimizer keeps updating)."""
    def transform(params: nnx.State) -> nnx.State:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: fake_quantize(x, specs[param_name(path)]) if param_name(path) in specs else x, params)

    return transform


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: LossFn, mesh: Mesh,
                    shardings: TrainState, *, compute_dtype=jnp.float32, remat: str = "none",
                    param_transform: ParamTransform | None = None):
    """A jitted step(state, batch) -> (state, metrics). Batch arrays are [accum, global_batch, ...]: the step
    accumulates gradients over the leading axis (gradient accumulation) before one optimizer update.
    `param_transform` maps the master weights to those the forward pass uses (QAT's fake quantization); `remat`
    names the rematerialisation policy (nano.model.REMAT_POLICIES)."""

    def micro_loss(params, batch, rng):
        if param_transform is not None:
            params = param_transform(params)
        model = nnx.merge(graphdef, params)
        model.dtype = compute_dtype  # bfloat16 compute over float32 master weights when asked
        model.remat = remat
        return loss_fn(model, batch, rng)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        accum = jax.tree.leaves(batch)[0].shape[0]

        def body(carry, inputs):
            grads_sum, i = carry
            (loss, metrics), grads = grad_fn(state.params, inputs, jax.random.fold_in(step_rng, i))
            return (jax.tree.map(jnp.add, grads_sum, grads), i + 1), (loss, metrics)

        if accum == 1:  # no accumulator: it would hold a second parameter-sized buffer through the backward pass
            (loss, metrics), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch),
                                             jax.random.fold_in(step_rng, 0))
            losses, metrics = loss[None], jax.tree.map(lambda m: m[None], metrics)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, _), (losses, metrics) = jax.lax.scan(body, (zeros, 0), batch)
            grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics.update(loss=jnp.mean(losses), grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return jax.jit(step, in_shardings=(shardings, step_batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
