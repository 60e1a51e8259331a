"""`nano distill` end to end on `tiny` (a tiny teacher directory, the `tiny` student preset): the run directory's
contents, the cache-teacher round trip through the CLI, on-policy steps, and refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distill.losses import KINDS
from distill.settings import LOSS_KINDS
from nano.checkpoint import flat_params, load_model_dir
from cli.main import cli
from nano.config import TINY

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

COMMON = ("--student", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--top-k", "8",
          "--eval-batches", "1", "--checkpoint-every", "2")


def nano(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def data_args(teacher_dir, corpus):
    return ("--teacher", teacher_dir, "--data", corpus / "train.txt", "--eval-data", corpus / "heldout.txt")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, tiny_model_dir, corpus):
    run = tmp_path_factory.mktemp("runs") / "online"
    nano("distill", *data_args(tiny_model_dir, corpus), *COMMON, "--eval-every", "2", "--out", run,
         "--eval-text", corpus / "heldout.txt")
    return run


def test_run_directory_holds_metrics_evals_final_model_plot_and_report(online_run, tiny_model_dir):
    metrics = lines(online_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m["tokens_seen"] == m["step"] * 2 * 16 and m["tokens_per_s"] > 0 and 0 < m["mfu"] < 10
        assert np.isfinite(m["loss"]) and m["kd"] > 0 and m["lr"] >= 0
    evals = lines(online_run / "eval.jsonl")
    assert [e["step"] for e in evals] == [2, 4]
    assert all(1 < e["heldout_ppl"] < 1e5 and 0 <= e["teacher_student_top1"] <= 1 for e in evals)
    report = json.loads((online_run / "report.json").read_text())
    assert report["tokens_seen"] == 4 * 32 and report["teacher_mode"] == "online"
    assert report["final_eval"] == evals[-1] and report["steps"] == 4
    assert report["mfu"] == pytest.approx(np.median([m["mfu"] for m in metrics[1:]]))
    assert set(report["text_ppl"]) == {"heldout.txt"} and report["text_ppl"]["heldout.txt"] > 1
    assert (online_run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The final student is a model directory every command takes, holding the trained parameters.
    student, tokenizer = load_model_dir(online_run / "final")
    assert student.config == TINY and tokenizer.vocab_size == TINY.vocab_size
    teacher, _ = load_model_dir(tiny_model_dir)
    moved = [k for k, v in flat_params(student).items() if not np.allclose(v, flat_params(teacher)[k])]
    assert moved, "the student's parameters should differ from the teacher's"


def test_cached_teacher_run_equals_online_run(online_run, tmp_path, tiny_model_dir, corpus):
    cache = tmp_path / "cache"
    args = data_args(tiny_model_dir, corpus)
    data_opts = ("--student", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--top-k", "8")
    out = nano("distill", "cache-teacher", *args, *data_opts, "--out", cache).output
    assert "4 steps" in out and len(list((cache / "shards").glob("step_*.npz"))) == 4
    run = tmp_path / "cached"
    nano("distill", *args, *COMMON, "--eval-every", "2", "--teacher-cache", cache, "--out", run)
    online, cached = lines(online_run / "metrics.jsonl"), lines(run / "metrics.jsonl")
    for a, b in zip(online, cached, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)
    assert json.loads((run / "report.json").read_text())["teacher_mode"] == "cache"
    # A cache made with other settings is refused with the reason.
    result = nano("distill", *args, *COMMON, "--seed", "1", "--teacher-cache", cache, "--out", tmp_path / "x",
                  ok=False)
    assert result.exit_code == 1 and "Error:" in result.output and "data" in result.output, result.output


def test_on_policy_steps_train_on_the_divergence_alone(tmp_path, tiny_model_dir, corpus):
    run = tmp_path / "onpolicy"
    nano("distill", *data_args(tiny_model_dir, corpus), *COMMON, "--on-policy-fraction", "1", "--steps", "2",
         "--out", run)
    metrics = lines(run / "metrics.jsonl")
    assert [m["on_policy"] for m in metrics] == [True, True]
    assert all(m["ce"] == 0 and m["kd"] > 0 for m in metrics)
    assert all(m["tokens"] <= 2 * (16 - 8 + 1) for m in metrics)  # only the generated half is scored


def test_resume_continues_and_refuses_other_settings(tmp_path, tiny_model_dir, corpus):
    run = tmp_path / "run"
    args = (*data_args(tiny_model_dir, corpus), *COMMON, "--out", run)
    nano("distill", *args)
    again = nano("distill", *args, ok=False)
    assert again.exit_code == 1 and "already holds a run" in again.output
    other = nano("distill", *args, "--lr", "0.1", "--resume", ok=False)
    assert other.exit_code == 1 and "lr" in other.output
    before = lines(run / "metrics.jsonl")
    nano("distill", *args, "--resume")  # already at its last step: nothing to train, the files stay whole
    assert [m["loss"] for m in lines(run / "metrics.jsonl")] == [m["loss"] for m in before]


@pytest.mark.parametrize("extra, message", [
    (("--loss", "ce", "--teacher-cache", "somewhere"), "--loss ce"),
    (("--on-policy-fraction", "1.5"), "on-policy-fraction"),
    (("--student", "nano-micro"), "vocabulary"),
    (("--teacher-cache", "nowhere"), "not a teacher cache"),
    (("--qat", "int3-b32"), "--qat takes"),
    (("--qat-embeddings", "int4"), "pass --qat SCHEME too"),
    (("--sparse-target", "rest", "--temperature", "2"), "--temperature 1 only"),
])
def test_bad_settings_give_one_error_line(tmp_path, tiny_model_dir, corpus, extra, message):
    result = nano("distill", *data_args(tiny_model_dir, corpus), *COMMON, *extra, "--out", tmp_path / "run", ok=False)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "run").exists()  # nothing written: the same command, corrected, starts cleanly


def test_the_command_lines_loss_list_is_the_loss_modules():
    assert set(LOSS_KINDS) == set(KINDS)  # the CLI's list (kept JAX-free) is the loss module's


def test_random_teacher_throughput_run(tmp_path, corpus):
    """A teacher preset with random weights (no checkpoint), bfloat16, with block remat: the Nano-size recipe's
    options run end to end on nano-micro and write their settings into run.json."""
    run = tmp_path / "random-teacher"
    nano("distill", "--teacher", "gemma3-270m", "--random-teacher", "--teacher-dtype", "bfloat16",
         "--student", "nano-micro", "--compute-dtype", "bfloat16", "--remat", "block", "--data", corpus / "train.txt",
         "--eval-data", corpus / "heldout.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
         "--top-k", "16", "--eval-batches", "1", "--out", run)
    settings = json.loads((run / "run.json").read_text())
    assert settings["random_teacher"] and settings["remat"] == "block"
    metrics = lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    bad = nano("distill", "--teacher", "tiny", "--random-teacher", "--data", corpus / "train.txt", "--out",
               tmp_path / "bad", ok=False)
    assert bad.exit_code != 0 and "needs a preset with the embedded tokenizer's 262,144 pieces; tiny has 512" in bad.output
    assert not (tmp_path / "bad").exists()
