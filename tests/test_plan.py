"""`nano plan`: the per-device estimate against XLA's own buffer assignment for the compiled train step and teacher
scoring, on fake CPU devices (each run its own process: the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

NANO = Path(sys.executable).parent / "nano"


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NANO), "plan", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args", [
    ("--devices", "2", "--mesh", "fsdp=2", "--teacher", "gemma3-270m"),
    ("--devices", "2", "--remat", "block"),
    ("--devices", "2", "--mesh", "fsdp=2", "--remat", "dots", "--compute-dtype", "bfloat16",
     "--teacher", "gemma3-270m", "--teacher-dtype", "bfloat16"),
], ids=["fsdp-teacher", "data-remat-block", "fsdp-dots-bf16-teacher"])
def test_estimate_is_within_15_percent_of_xla(args):
    out = _plan("nano-micro", "--batch-size", "8", "--seq-len", "256", "--measure", "--json", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    est, measured = result["estimate"], result["measured"]
    assert 0.85 <= result["estimate_over_measured"] <= 1.15, (est, measured)
    # The resident state (parameters and AdamW's moments, sharded) is exact, not estimated.
    parts = est["parts"]
    assert abs(measured["state"] - parts["parameters"] - parts["optimizer"]) <= 0.01 * measured["state"]
    if "--teacher" in args:
        assert abs(measured["teacher_params"] - est["teacher_params"]) <= 0.05 * measured["teacher_params"]


def test_sharding_and_remat_shrink_the_plan():
    def total(*args):
        out = _plan("nano-1", "--json", "--teacher", "gemma3-4b", "--seq-len", "1024", *args)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)["estimate"]

    one = total("--devices", "1")
    fsdp = total("--devices", "8", "--mesh", "fsdp=8")
    remat = total("--devices", "8", "--mesh", "fsdp=8", "--remat", "block")
    assert fsdp["parts"]["parameters"] * 8 == pytest.approx(one["parts"]["parameters"], rel=0.01)
    assert fsdp["parts"]["teacher"] < one["parts"]["teacher"]
    assert remat["parts"]["activations"] < 0.5 * fsdp["parts"]["activations"]
    assert not one["fits"] and remat["fits"]  # 80 GiB: one device cannot, eight sharded with remat can


def test_verdict_and_errors():
    out = _plan("nano-2", "--devices", "1", "--memory", "24")
    assert out.returncode == 0 and "does not fit in 24 GiB" in out.stdout
    out = _plan("nano-micro", "--devices", "2", "--memory", "24", "--batch-size", "8")
    assert out.returncode == 0 and "fits in 24 GiB" in out.stdout and "does not" not in out.stdout
    bad = _plan("nano-1", "--devices", "2", "--batch-size", "3")
    assert bad.returncode != 0 and "does not split over data × fsdp = 2 devices" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = _plan("nano-1", "--devices", "4", "--mesh", "fsdp=2")
    assert bad.returncode != 0 and "--mesh fsdp=2 has 2 devices, --devices is 4" in bad.stderr


SHARDED_TEACHER = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from distill.sharding import make_mesh
from distill.teacher import OnlineTeacher, random_teacher
from nano.checkpoint import flat_params
from nano.config import TINY
from nano.model import init_model

mesh = make_mesh("fsdp=2")
teacher = random_teacher(TINY, dtype=jnp.bfloat16, mesh=mesh, seed=0)
table = teacher.embedder.embedding.get_value()
want = flat_params(init_model(TINY, seed=0))
same = all(np.array_equal(np.asarray(v), np.asarray(jnp.asarray(want[n], jnp.bfloat16)))
           for n, v in flat_params(teacher).items())
tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 4, 16)).astype(np.int32)
batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy(),
         "segment_ids": np.ones_like(tokens)}
sharded = OnlineTeacher(teacher, k=8, mesh=mesh, vocab_chunk=128)(batch, 0)
graphdef, state = nnx.split(teacher)
local = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
single = OnlineTeacher(local, k=8, vocab_chunk=128)(batch, 0)
print(json.dumps({"spec": str(table.sharding.spec), "shard": list(table.addressable_shards[0].data.shape),
                  "dtype": str(table.dtype), "same": bool(same),
                  "ids_sharding": str(sharded["teacher_ids"].sharding.spec),
                  "ids_equal": bool(np.array_equal(np.asarray(sharded["teacher_ids"]),
                                                   np.asarray(single["teacher_ids"])))}))
"""


def test_random_teacher_is_created_sharded():
    """--random-teacher: the teacher's weights are made on the mesh by the partition rules (each device its
    shard), equal init_model's values in the teacher dtype, and the sharded teacher scores like an unsharded one."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", SHARDED_TEACHER], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["spec"] in ("PartitionSpec('tensor', 'fsdp')", "P('tensor', 'fsdp')", "P(None, 'fsdp')",
                              "PartitionSpec(None, 'fsdp')")
    assert result["shard"] == [512, 32] and result["dtype"] == "bfloat16" and result["same"]
    assert "fsdp" in result["ids_sharding"] and result["ids_equal"]
