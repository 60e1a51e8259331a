"""`nano distill --distributed` for real: two processes on this machine, one CPU device each, joined by
jax.distributed (gloo collectives on CPU) into one `--mesh data=2`. Their loss trajectory is one process's; a
worker killed with -9 makes the other leave in one line at once (no hang in a collective or in the shutdown
barrier); both resumed continue exactly where the killed run's last checkpoint left off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts several JAX processes

NANO = str(Path(sys.executable).parent / "nano")
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
SETTINGS = ("--student", "tiny", "--batch-size", "2", "--seq-len", "16", "--top-k", "8", "--eval-batches", "1")


def _args(teacher_dir, corpus, steps: int, checkpoint_every: int) -> list[str]:
    return [str(a) for a in ("distill", "--teacher", teacher_dir, "--data", corpus / "train.txt", "--eval-data",
                             corpus / "heldout.txt", *SETTINGS, "--steps", steps,
                             "--checkpoint-every", checkpoint_every)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(args: list[str], out: Path, *extra: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run writing to the same --out (a shared directory, as Orbax needs)."""
    port = _free_port()
    return [subprocess.Popen([NANO, *args, "--out", str(out), "--mesh", "data=2", "--distributed", "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        results.append((p.returncode, err))
    return results


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_process(args: list[str], out: Path) -> None:
    done = subprocess.run([NANO, *args, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_processes_train_like_one(tmp_path, tiny_model_dir, corpus):
    args = _args(tiny_model_dir, corpus, steps=4, checkpoint_every=2)
    for code, err in _finish(_start_pair(args, tmp_path / "two")):
        assert code == 0, err[-3000:]
    _one_process(args, tmp_path / "one")
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == 4 and two == pytest.approx(one, rel=0, abs=1e-5)
    # Process 0 wrote the run's files once; both saved each checkpoint together.
    run = tmp_path / "two"
    assert {p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()} == {"2", "4"}
    assert (run / "final" / "config.json").exists() and json.loads((run / "report.json").read_text())["steps"] == 4
    assert len((run / "eval.jsonl").read_text().splitlines()) == 1


def test_a_killed_worker_stops_the_other_in_one_line_and_both_resume_exactly(tmp_path, tiny_model_dir, corpus):
    steps, every = 60, 10
    args = _args(tiny_model_dir, corpus, steps=steps, checkpoint_every=every)
    run = tmp_path / "run"
    procs = _start_pair(args, run)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 25):  # past two checkpoints
        assert time.monotonic() < deadline and procs[0].poll() is None, "the run did not get going"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed_at
    procs[1].wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[0].returncode == 1, err[-3000:]
    assert lines[-1].startswith("Error: process 0: another process of this distributed run stopped"), lines[-3:]
    assert "--resume" in lines[-1] and "Traceback" not in err
    assert waited < 60, f"the surviving process took {waited:.0f} s to leave"
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and f"its last checkpoint is step {saved[-1]}" in lines[-1]
    # Both started again with --resume: the trajectory of an uninterrupted run, step for step.
    for code, err in _finish(_start_pair(args, run, "--resume")):
        assert code == 0, err[-3000:]
    _one_process(args, tmp_path / "uninterrupted")
    resumed, whole = _losses(run), _losses(tmp_path / "uninterrupted")
    assert len(resumed) == steps and resumed == pytest.approx(whole, rel=0, abs=1e-5)
