"""`nano plan`: will a distillation run fit? Each device's memory for one `nano distill` step, part by part.

The estimate needs no devices and allocates nothing:
- parameters, gradients (twice when accumulating: the running sum and the micro-batch's) and AdamW's two
  moments: float32, each parameter's shard under the partition rules (distill.sharding) on the planned mesh;
- activations: what JAX's autodiff keeps for the backward pass under the remat policy (the residuals of the loss's
  VJP, traced on shapes for one device's share of the batch), plus the working set of the backward pass: one
  block's activations (recomputed when remat drops them), their gradients, and the loss's vocabulary chunk;
- teacher: its parameters (teacher dtype, sharded like the student's) and its forward pass (one block's
  activations, and the vocabulary chunks its k tokens are drawn from);
- KV cache: the student's cache while it samples its own sequences (`--on-policy`).

`measure` compiles the real train step and the teacher's scoring on this process's devices (fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N) and reads XLA's own buffer assignment, which is what the
estimate is checked against.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from distill.sharding import AXES, BATCH_AXES, param_spec, parse_mesh
from nano.config import ModelConfig
from nano.errors import NanoError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    devices: int = 1
    memory_gib: float = 80.0
    mesh: str | None = None  # like `nano distill --mesh`; None: data parallel over every device
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    compute_dtype: str = "float32"
    teacher_dtype: str = "float32"
    remat: str = "none"
    top_k: int = 256
    vocab_chunk: int = 16384
    on_policy: bool = False

    def mesh_sizes(self) -> dict[str, int]:
        sizes = parse_mesh(self.mesh, devices=self.devices)
        if math.prod(sizes.values()) != self.devices:
            raise NanoError(f"--mesh {self.mesh} has {math.prod(sizes.values())} devices, "
                            f"--devices is {self.devices}")
        return sizes

    def local_batch(self) -> int:
        """Sequences per device per micro-batch: the batch is split over data × fsdp."""
        split = math.prod(self.mesh_sizes()[a] for a in BATCH_AXES)
        if self.batch_size % split:
            raise NanoError(f"--batch-size {self.batch_size} does not split over data × fsdp = {split} devices")
        return self.batch_size // split


def _abstract_mesh(sizes: dict[str, int]):
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def sharded_bytes(config: ModelConfig, sizes: dict[str, int], itemsize: int) -> int:
    """One device's bytes of the parameters under the partition rules (an axis that does not divide a dimension
    leaves it whole, as on the real mesh)."""
    from nano.checkpoint import param_shapes

    mesh = _abstract_mesh(sizes)
    total = 0
    for name, shape in param_shapes(config).items():
        spec = param_spec(name, shape, mesh)
        local = [d // (sizes[a] if a else 1) for d, a in zip(shape, (*spec, *[None] * len(shape)))]
        total += math.prod(local) * itemsize
    return total


def _batch(batch: int, seq: int, k: int) -> dict:
    """A train step's batch, shapes only: the data's arrays (nano.evaluate.BATCH_KEYS) and the sparse teacher's."""
    from nano.evaluate import BATCH_KEYS

    shape = (batch, seq)
    data = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "weights" else jnp.int32) for key in BATCH_KEYS}
    return {**data, "teacher_ids": jax.ShapeDtypeStruct((*shape, k), jnp.int32),
            "teacher_logprobs": jax.ShapeDtypeStruct((*shape, k), jnp.float32)}


def residual_bytes(f, *args) -> int:
    """Bytes JAX's autodiff keeps from f's forward pass for its backward pass (the VJP's residuals), leaving out
    those that are f's own arguments (the parameters and the batch, counted elsewhere)."""
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(f, *a))(*args).jaxpr
    primal = jax.tree.leaves(jax.eval_shape(f, *args))
    inputs = set(jaxpr.invars)
    seen, total = set(), 0
    for var in jaxpr.outvars[len(primal):]:
        if not isinstance(var, Literal) and var not in inputs and var not in seen:
            seen.add(var)
            total += math.prod(var.aval.shape) * var.aval.dtype.itemsize
    return total


def activation_bytes(config: ModelConfig, settings: PlanSettings) -> int:
    """One device's activations in the student's train step (see the module docstring)."""
    from flax import nnx

    from distill.teacher import make_loss
    from nano.model import Block, abstract_model

    b, s = settings.local_batch(), settings.seq_len
    dtype = getattr(jnp, settings.compute_dtype)
    model = abstract_model(config)
    graphdef, params = nnx.split(model, nnx.Param)
    loss = make_loss(kind="fkl", vocab_chunk=settings.vocab_chunk)

    def step_loss(params, batch):
        net = nnx.merge(graphdef, params)
        net.dtype, net.remat = dtype, settings.remat
        return loss(net, batch, None)[0]

    kept = residual_bytes(step_loss, params, _batch(b, s, settings.top_k))
    # The backward pass's working set: one block's full activations (recomputed there under remat) and their
    # gradients, and one vocabulary chunk's logits, probabilities and gradient.
    block = nnx.eval_shape(lambda: Block(config, config.layer_types[0], rngs=nnx.Rngs(0)))
    block_graph, block_params = nnx.split(block, nnx.Param)
    x = jax.ShapeDtypeStruct((b, s, config.d_model), dtype)
    positions = jax.ShapeDtypeStruct((b, s), jnp.int32)
    one_block = residual_bytes(lambda p, x, pos: nnx.merge(block_graph, p)(x, pos, pos)[0].sum(),
                               block_params, x, positions)
    chunk = 3 * b * s * min(settings.vocab_chunk, config.vocab_size) * 4
    return kept + (one_block if settings.remat != "none" else 0) + 2 * b * s * config.d_model * 4 + chunk


def teacher_bytes(config: ModelConfig, settings: PlanSettings, student_vocab: int | None = None) -> tuple[int, int]:
    """(the teacher's parameters on one device, its forward pass's working set): one block's activations, and
    the vocabulary walk of distill.losses.sparse_from_hidden, six float32 arrays of [batch, seq, k + vocab_chunk]
    (a chunk's logits, their exponentials, Gumbel noise and scores, and the merge with the best k so far); for a
    student with a trimmed vocabulary, four of [batch, seq, student vocab] instead of the k (the mass folded onto
    the student's pieces, its log, the noise and the scores drawn from)."""
    b, s = settings.local_batch(), settings.seq_len
    itemsize = np.dtype(getattr(jnp, settings.teacher_dtype)).itemsize
    params = sharded_bytes(config, settings.mesh_sizes(), itemsize)
    chunk = min(settings.vocab_chunk, config.vocab_size)
    trimmed = student_vocab is not None and student_vocab < config.vocab_size
    walk = 6 * (chunk + settings.top_k) if not trimmed else 3 * chunk + 4 * student_vocab
    forward = walk * b * s * 4 + 8 * b * s * max(config.ffn_dim, config.d_model) * itemsize
    return params, forward


def kv_cache_bytes(config: ModelConfig, settings: PlanSettings) -> int:
    """The student's cache while it samples batch × seq_len tokens of its own (on-policy distillation)."""
    from nano.kv_cache import KVCache

    cache = jax.eval_shape(lambda: KVCache.zeros(config, settings.local_batch(), settings.seq_len))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in (*cache.k, *cache.v))


def estimate(student: ModelConfig, teacher: ModelConfig | None, settings: PlanSettings) -> dict:
    """One device's bytes per part, the peak, and whether it fits in `settings.memory_gib`.

    The parameters, the optimizer and the teacher's weights stay resident. The train step holds gradients and
    activations during the backward pass, then gradients and AdamW's updates (two parameter-sized trees) during
    the update; the teacher's forward runs in its own program, the KV cache within on-policy sampling: the peak
    is the resident bytes plus the largest of those."""
    params = sharded_bytes(student, settings.mesh_sizes(), 4)
    teacher_params, teacher_forward = (teacher_bytes(teacher, settings, student.vocab_size) if teacher is not None
                                       else (0, 0))
    # Accumulating over micro-batches keeps the running sum beside each micro-batch's gradients.
    gradients = params * (2 if settings.grad_accum > 1 else 1)
    parts = {"parameters": params, "gradients": gradients, "optimizer": 2 * params,
             "activations": activation_bytes(student, settings), "teacher": teacher_params + teacher_forward,
             "kv_cache": kv_cache_bytes(student, settings) if settings.on_policy else 0}
    resident = params + parts["optimizer"] + teacher_params
    step = max(parts["gradients"] + parts["activations"], 2 * params)
    peak = resident + max(step, teacher_forward, parts["kv_cache"])
    return {"parts": parts, "teacher_params": teacher_params, "resident": resident, "total": peak,
            "memory": int(settings.memory_gib * GiB), "fits": peak <= settings.memory_gib * GiB,
            "mesh": settings.mesh_sizes(), "local_batch": settings.local_batch()}


def measure(student: ModelConfig, teacher: ModelConfig | None, settings: PlanSettings) -> dict:
    """XLA's per-device memory for the real programs, compiled (not run) on this process's devices: the train
    step's arguments, outputs and temporaries (the donated state counted once), and the teacher's scoring beside
    the student's state. Needs jax.device_count() == settings.devices."""
    from flax import nnx
    from distill.sharding import make_mesh, model_shardings, replicated, step_batch_sharding
    from distill.teacher import OnlineTeacher, make_loss
    from distill.step import (OptimConfig, abstract_state, make_optimizer, make_train_step, model_graphdef,
                               state_shardings)
    from nano.model import abstract_model

    if jax.device_count() != settings.devices:
        raise NanoError(f"measuring needs {settings.devices} devices, this process has {jax.device_count()} (for "
                        f"fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count={settings.devices})")
    mesh = make_mesh(",".join(f"{a}={n}" for a, n in settings.mesh_sizes().items()))
    optimizer = make_optimizer(OptimConfig())
    abstract = abstract_state(student, optimizer)
    shardings = state_shardings(abstract, mesh)
    loss = make_loss(kind="fkl", vocab_chunk=settings.vocab_chunk)
    step = make_train_step(model_graphdef(student), optimizer, loss, mesh, shardings,
                           compute_dtype=getattr(jnp, settings.compute_dtype), remat=settings.remat)
    batch = {k: jax.ShapeDtypeStruct((settings.grad_accum, *v.shape), v.dtype)
             for k, v in _batch(settings.batch_size, settings.seq_len, settings.top_k).items()}
    train = step.lower(abstract, batch).compile().memory_analysis()
    state = train.alias_size_in_bytes  # the donated state: its input and output buffers are the same memory
    out = {"state": state, "train_temp": train.temp_size_in_bytes,
           "train_peak": train.argument_size_in_bytes + train.output_size_in_bytes - state + train.temp_size_in_bytes}
    out["total"] = out["train_peak"]
    if teacher is not None:
        dtype = getattr(jnp, settings.teacher_dtype)
        graphdef, teacher_state = nnx.split(abstract_model(teacher, dtype=dtype))
        teacher_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), teacher_state)  # as loaded
        scorer = OnlineTeacher(nnx.merge(graphdef, teacher_state), k=settings.top_k, vocab_chunk=settings.vocab_chunk)
        on_mesh = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        weights = jax.tree.map(on_mesh, scorer.state, model_shardings(scorer.state, mesh))
        text = {k: on_mesh(batch[k], step_batch_sharding(mesh)) for k in ("tokens", "positions", "segment_ids")}
        keys = on_mesh(jax.ShapeDtypeStruct((settings.grad_accum, 2), jnp.uint32), replicated(mesh))
        score = scorer._score.lower(weights, text, keys).compile().memory_analysis()
        out["teacher_params"] = score.argument_size_in_bytes
        out["teacher_peak"] = score.argument_size_in_bytes + score.output_size_in_bytes + score.temp_size_in_bytes
        # Both programs run each step; the student's state and the teacher's weights stay resident throughout.
        out["total"] = max(out["train_peak"] + out["teacher_params"], state + out["teacher_peak"])
    return out
