"""Sharded training equals single-device training: 10 steps on `tiny`, data=2 × fsdp=4 over 8 fake CPU devices.

Each run is its own process, because the number of (fake) CPU devices is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

RUN = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from distill.sharding import make_mesh
    from distill.step import OptimConfig, init_state, make_optimizer, make_train_step
    from nano.config import TINY
    from nano.scoring import next_token_nll as token_nll

    mesh = make_mesh(sys.argv[1] if len(sys.argv) > 1 else None)
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, total_steps=10))
    graphdef, state = init_state(TINY, optimizer, seed=0, mesh=mesh)

    def loss_fn(model, batch, rng):
        nll = token_nll(model(batch["tokens"])[0], batch["tokens"])[:, :-1]
        return jnp.mean(nll), {"ce": jnp.mean(nll)}

    step = make_train_step(graphdef, optimizer, loss_fn, mesh, jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(10):
        batch = {"tokens": rng.integers(0, TINY.vocab_size, (2, 8, 32)).astype(np.int32)}  # accumulate 2
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    kernel = state.params["layers"][0]["attn"]["q_proj"]["kernel"][...]
    print(json.dumps({"losses": losses, "spec": str(kernel.sharding.spec),
                      "shards": len(kernel.addressable_shards)}))
""")


def _run(devices: int, mesh: str | None) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", RUN, *([mesh] if mesh else [])], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single():
    return _run(1, None)


def test_sharded_trajectory_matches_single_device(single):
    sharded = _run(8, "data=2,fsdp=4")
    assert sharded["spec"] in ("PartitionSpec('fsdp', 'tensor')", "P('fsdp', 'tensor')") and sharded["shards"] == 8
    assert np.abs(np.array(sharded["losses"]) - np.array(single["losses"])).max() <= 1e-4
    assert single["losses"][-1] < single["losses"][0]  # it trains


def test_tensor_axis_matches_too(single):
    sharded = _run(8, "data=2,fsdp=2,tensor=2")
    assert np.abs(np.array(sharded["losses"]) - np.array(single["losses"])).max() <= 1e-4
