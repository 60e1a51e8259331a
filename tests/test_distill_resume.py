"""kill -9 mid-run, then resume: the loss trajectory equals the uninterrupted run's, step for step."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

TESTS = Path(__file__).parent

RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import jax.numpy as jnp
    from hf_tiny import train_tokenizer
    from distill.data import make_datasets
    from distill.loop import LoopConfig, TrainJob, train
    from distill.step import OptimConfig
    from nano.config import TINY
    from nano.tokenizer import Tokenizer

    run_dir, corpus, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    tokenizer = Tokenizer(train_tokenizer(TINY.vocab_size))
    data = make_datasets([corpus], tokenizer, seq_len=32, batch_size=4, seed=3, heldout_fraction=0.0)

    def loss_fn(model, batch, rng):
        logits, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        logp = jnp.take_along_axis(logits - jax.nn.logsumexp(logits, -1, keepdims=True),
                                   batch["targets"][..., None], -1)[..., 0]
        ce = -jnp.sum(logp * batch["weights"]) / jnp.sum(batch["weights"])
        return ce, {{"ce": ce}}

    import jax

    def on_step(step, record):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = LoopConfig(steps=12, optim=OptimConfig(lr=1e-2, warmup_steps=2, total_steps=12), grad_accum=2,
                     checkpoint_every=4, seed=1)
    train(TrainJob(TINY, data, loss_fn, cfg, on_step=on_step), run_dir, resume=resume)
""").format(tests=str(TESTS))


def _run(run_dir, corpus, *, resume=False, kill_at=-1):
    return subprocess.run([sys.executable, "-c", RUN, str(run_dir), str(corpus), "1" if resume else "0",
                           str(kill_at)], capture_output=True, text=True, timeout=600)


def _losses(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in lines]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hf_tiny import training_text

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(training_text(lines=1500)))
    return path


def test_killed_and_resumed_run_equals_uninterrupted(corpus, tmp_path):
    whole = _run(tmp_path / "whole", corpus)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run(tmp_path / "killed", corpus, kill_at=10)  # last checkpoint at step 8
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, *_ in _losses(tmp_path / "killed")] == list(range(1, 11))
    resumed = _run(tmp_path / "killed", corpus, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    assert len(_losses(tmp_path / "whole")) == 12


def test_resume_without_checkpoint_is_refused(corpus, tmp_path):
    out = _run(tmp_path / "empty", corpus, resume=True)
    assert out.returncode != 0 and "no checkpoint" in out.stderr
