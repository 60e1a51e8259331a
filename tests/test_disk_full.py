"""A disk that fills while a run writes: a checkpoint, a teacher-cache shard, an export. Each time one clear line
and a non-zero exit, the last good checkpoint or shard intact, nothing under a final name, and the same command
continues once there is space again. The disk is a small tmpfs the test mounts (root only) and later grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
TINY_RUN = ("--student", "tiny", "--batch-size", "2", "--seq-len", "16", "--top-k", "8")


class Disk:
    """A tmpfs of a given size mounted at `path`, which `resize` grows or shrinks in place."""

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disks = []

    def make(size: int) -> Disk:
        disks.append(Disk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def run(*args, ok: bool = True) -> subprocess.CompletedProcess:
    tool, *rest = args
    done = subprocess.run([str(BIN / tool), *map(str, rest)], capture_output=True, text=True, env=ENV, timeout=900)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ERROR:absl" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no space left on the device holding"), last
    return last


def hidden_leftovers(root: Path) -> list[Path]:
    """Temporary names (nano's `.name.tmp...`, Orbax's `N.orbax-checkpoint-tmp`) left anywhere under root."""
    return [p for p in root.rglob("*") if p.name.startswith(".") or "tmp" in p.name]


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_continues(small_disk, tmp_path, tiny_model_dir,
                                                                            corpus):
    args = ("nano", "distill", "--teacher", tiny_model_dir, "--data", corpus / "train.txt", "--eval-data",
            corpus / "heldout.txt", *TINY_RUN, "--steps", "8", "--checkpoint-every", "2", "--eval-batches", "1")
    whole = tmp_path / "whole"
    run(*args, "--out", whole)  # the uninterrupted run, and the size of one checkpoint
    checkpoint = tree_bytes(whole / "checkpoints" / "8")
    disk = small_disk(int(2.5 * checkpoint) + 64 * 1024)  # two checkpoints fit, the third does not
    out = disk.path / "run"
    line = one_error_line(run(*args, "--out", out, ok=False))
    assert "the checkpoint of step 6 was not written and the last complete one is step 4" in line
    assert "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]  # no half-written step 6
    assert not (out / "final").exists() and not hidden_leftovers(out)
    disk.resize(64 * 2**20)
    run(*args, "--out", out, "--resume")
    assert losses(out) == pytest.approx(losses(whole), rel=0, abs=1e-6) and len(losses(out)) == 8
    assert (out / "final" / "config.json").exists()


def test_a_full_disk_in_the_teacher_cache_keeps_whole_shards_and_the_rerun_completes(small_disk, tmp_path,
                                                                                    tiny_model_dir, corpus):
    args = ("nano", "distill", "cache-teacher", "--teacher", tiny_model_dir, "--data", corpus / "train.txt",
            *TINY_RUN, "--steps", "60")
    whole = tmp_path / "whole"
    run(*args, "--out", whole)
    disk = small_disk(tree_bytes(whole) // 2)
    cache = disk.path / "cache"
    line = one_error_line(run(*args, "--out", cache, ok=False))
    assert "run the same command again" in line
    held = sorted((cache / "shards").glob("step_*.npz"))
    assert 0 < len(held) < 60 and not hidden_leftovers(cache)
    for shard in held:  # every shard under a final name is whole and is the uninterrupted cache's
        with np.load(shard) as got, np.load(whole / "shards" / shard.name) as want:
            assert np.array_equal(got["teacher_logprobs"], want["teacher_logprobs"])
    disk.resize(64 * 2**20)
    assert "60 steps" in run(*args, "--out", cache).stdout
    for shard in sorted((whole / "shards").glob("step_*.npz")):
        with np.load(cache / "shards" / shard.name) as got, np.load(shard) as want:
            assert np.array_equal(got["teacher_ids"], want["teacher_ids"])


@pytest.mark.parametrize("fraction", [0.05, 0.6])  # the converter's graph, then the weights or the bundle
def test_a_full_disk_during_an_export_leaves_nothing(small_disk, tmp_path, tiny_model_dir, fraction):
    args = ("nano-export", tiny_model_dir, "--quant", "int4-b32", "--prefill-lengths", "8,32", "--max-tokens", "64")
    whole = tmp_path / "whole.litertlm"
    run(*args, "--out", whole)
    disk = small_disk(int(fraction * whole.stat().st_size))
    out = disk.path / "student.litertlm"
    one_error_line(run(*args, "--out", out, ok=False))
    assert list(disk.path.iterdir()) == []  # neither the artifact nor a scratch directory
    disk.resize(64 * 2**20)
    run(*args, "--out", out)
    assert run("nano", "verify", out).returncode == 0
