"""The train step's precision option: bfloat16 compute over float32 master weights."""

import jax
import jax.numpy as jnp
import numpy as np

from distill.sharding import make_mesh
from distill.train import OptimConfig, init_state, make_optimizer, make_train_step
from nano.config import TINY
from nano.perplexity import token_nll


def _run(compute_dtype, steps=3):
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
                           compute_dtype=compute_dtype)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, {"tokens": rng.integers(0, TINY.vocab_size, (1, 4, 32)).astype(np.int32)})
        losses.append(float(metrics["loss"]))
    return state, losses, seen["hidden"]


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
