import pytest
"""The train step's options: bfloat16 compute over float32 master weights; rematerialisation policies."""

import jax
import jax.numpy as jnp
import numpy as np

from distill.sharding import make_mesh
from distill.step import OptimConfig, init_state, make_optimizer, make_train_step
from nano.config import TINY
from nano.scoring import next_token_nll as token_nll


def _run(compute_dtype, steps=3, remat="none"):
    mesh = make_mesh(None)
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=steps))
    graphdef, state = init_state(TINY, optimizer, seed=0, mesh=mesh)
    seen = {}

    def loss_fn(model, batch, rng):
        hidden, _ = model(batch["tokens"], return_hidden=True)
        seen["hidden"] = hidden.dtype  # recorded while tracing
        logits = model.head(hidden)  # float32 logits either way
        nll = token_nll(logits, batch["tokens"])[:, :-1]
        return jnp.mean(nll), {"ce": jnp.mean(nll)}

    step = make_train_step(graphdef, optimizer, loss_fn, mesh, jax.tree.map(lambda x: x.sharding, state),
                           compute_dtype=compute_dtype, remat=remat)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, {"tokens": rng.integers(0, TINY.vocab_size, (1, 4, 32)).astype(np.int32)})
        losses.append(float(metrics["loss"]))
    return state, losses, seen["hidden"]


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_masters():
    state32, losses32, dtype32 = _run(jnp.float32)
    state16, losses16, dtype16 = _run(jnp.bfloat16)
    assert dtype32 == jnp.float32 and dtype16 == jnp.bfloat16  # the forward really ran in bfloat16
    assert {x.dtype for x in jax.tree.leaves(state16.params)} == {jnp.dtype(jnp.float32)}  # masters stay float32
    # Same trajectory up to bfloat16 rounding, yet not bit-identical (so the option is not a no-op).
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
    assert losses16 != losses32
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state16.params),
                                                          jax.tree.leaves(state32.params))]
    assert 0 < max(moved) < 0.1


@pytest.mark.slow
def test_remat_policies_recompute_the_same_training():
    """Remat changes what the backward pass keeps, not what it computes: the same losses and parameters."""
    state, losses, _ = _run(jnp.float32)
    for policy in ("dots", "block"):
        state_r, losses_r, _ = _run(jnp.float32, remat=policy)
        np.testing.assert_allclose(losses_r, losses, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(state_r.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_keeps_less_for_the_backward_pass():
    """What autodiff keeps (distill.plan.residual_bytes): 'block' keeps each block's input only."""
    from flax import nnx

    from distill.plan import residual_bytes
    from nano.model import init_model

    graphdef, params = nnx.split(init_model(TINY), nnx.Param)
    tokens = jnp.zeros((4, 64), jnp.int32)

    def kept(policy):
        def loss(params):
            model = nnx.merge(graphdef, params)
            model.remat = policy
            return model(tokens)[0].sum()

        return residual_bytes(loss, params)

    none, dots, block = kept("none"), kept("dots"), kept("block")
    per_block_input = 4 * 64 * TINY.d_model * 4
    assert block < dots < none
    assert block <= TINY.num_layers * per_block_input + 4 * 64 * TINY.vocab_size * 4 + 4 * 64 * TINY.d_model * 8
