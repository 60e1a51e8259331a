"""Run plots and the CE-vs-KD comparison from synthetic run directories (no training needed)."""

import json
import math
import subprocess
import sys

import matplotlib.image
import pytest

from distill.report import _eval_points, compare_runs, plot_run, read_jsonl
from nano.errors import NanoError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 256


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _fake_run(root, name, kind, *, ppl_scale, text_ppl):
    """A 20-step run with evaluations every 5 steps; held-out ppl = ppl_scale · 100 / step."""
    run = root / name
    run.mkdir()
    kd = 0.0 if kind == "ce" else 1.0
    _write_jsonl(run / "metrics.jsonl", [
        {"step": s, "loss": 5.0 / s + kd, "ce": 5.0 / s, "kd": kd / s, "grad_norm": 1.0, "lr": 1e-3,
         "tokens_per_s": 1000.0, "seconds": 0.256, "tokens": TOKENS_PER_STEP} for s in range(1, 21)])
    evals = [{"step": s, "heldout_ppl": ppl_scale * 100 / s, "heldout_nll": math.log(ppl_scale * 100 / s),
              "heldout_tokens": 500} for s in (5, 10, 15, 20)]
    _write_jsonl(run / "eval.jsonl", evals)
    final = {**evals[-1], "teacher_student_top1": 0.5 if kind == "ce" else 0.7,
             "kl_teacher_student": 0.9 if kind == "ce" else 0.3, "bits_per_byte": 1.0 if kind == "ce" else 0.9}
    del final["step"]
    (run / "report.json").write_text(json.dumps({"final_eval": final, "tokens_seen": 20 * TOKENS_PER_STEP,
                                                 "loss_kind": kind, "text_ppl": text_ppl}))
    return run


@pytest.fixture
def runs(tmp_path):
    return {"base": _fake_run(tmp_path, "base", "ce", ppl_scale=1.0, text_ppl={"wiki": 40.0, "code": 80.0}),
            "kd": _fake_run(tmp_path, "kd", "fkl", ppl_scale=0.8, text_ppl={"wiki": 30.0, "code": 88.0})}


def _check_png(path, *, min_size=(200, 200)):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    assert image.std() > 0  # something was drawn, not a blank canvas


def test_plot_run_writes_png(runs):
    path = plot_run(runs["kd"])
    assert path == runs["kd"] / "loss_curve.png"
    _check_png(path)
    assert not [p for p in runs["kd"].iterdir() if p.name.endswith(".tmp")]  # the temporary was renamed away


def test_plot_run_without_evals(runs):
    (runs["base"] / "eval.jsonl").unlink()
    _check_png(plot_run(runs["base"]))


def test_compare_runs(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs(runs, out)
    assert result["ce_run"] == "base"
    kd = result["runs"]["kd"]
    assert kd["heldout_ppl_change_vs_ce"] == pytest.approx((0.8 * 5) / 5 - 1.0)  # final ppl 4.0 vs 5.0: −20%
    assert kd["text_ppl_change_vs_ce"] == pytest.approx({"wiki": 30 / 40 - 1, "code": 88 / 80 - 1})
    assert "heldout_ppl_change_vs_ce" not in result["runs"]["base"]
    assert kd["tokens_seen"] == 20 * TOKENS_PER_STEP and kd["kl_teacher_student"] == 0.3
    assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "comparison.md").read_text()
    assert ("| run | loss | tokens | held-out ppl | held-out bits/byte | ppl code | ppl wiki | bits/byte code | "
            "bits/byte wiki | top-1 agreement |") in md
    assert kd["heldout_bits_per_byte_change_vs_ce"] == pytest.approx(0.9 / 1.0 - 1.0)  # reports compare by it
    assert "KD vs CE: held-out bits per byte −10.0%" in md
    assert "| base | ce | 5,120 | 5.000 | 1.0000 | 80.000 | 40.000 | – | – | 0.500 | 0.9000 |" in md
    assert "| kd | fkl | 5,120 | 4.000 | 0.9000 | 88.000 | 30.000 | – | – | 0.700 | 0.3000 |" in md
    assert "KD vs CE: held-out perplexity −20.0% at equal tokens (5,120) — kd (fkl) vs base (ce)" in md
    _check_png(out / "comparison.png")


def test_eval_points_map_steps_to_tokens_seen(runs):
    metrics = read_jsonl(runs["kd"] / "metrics.jsonl")
    steps, seen, ppl = _eval_points(runs["kd"], metrics)
    assert steps == [5, 10, 15, 20] and seen == [5 * 256, 10 * 256, 15 * 256, 20 * 256]
    assert ppl == pytest.approx([16.0, 8.0, 80 / 15, 4.0])
    _write_jsonl(runs["kd"] / "eval.jsonl", [{"step": 5, "heldout_ppl": 9.0, "tokens_seen": 777}])
    assert _eval_points(runs["kd"], metrics)[1] == [777]  # an eval line's own count wins


def test_compare_without_ce_run_has_no_changes(runs, tmp_path):
    result = compare_runs({"kd": runs["kd"]}, tmp_path / "cmp")
    assert result["ce_run"] is None and result["summary"] == []
    assert "heldout_ppl_change_vs_ce" not in result["runs"]["kd"]


def test_unequal_tokens_are_said(runs, tmp_path):
    report = json.loads((runs["kd"] / "report.json").read_text())
    (runs["kd"] / "report.json").write_text(json.dumps({**report, "tokens_seen": 10_000}))
    md = (compare_runs(runs, tmp_path / "cmp")["summary"])[0]
    assert "at 10,000 vs 5,120 tokens" in md


def test_missing_files_are_clear_errors(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NanoError, match="no metrics.jsonl"):
        plot_run(empty)
    with pytest.raises(NanoError, match="no report.json"):
        compare_runs({"base": runs["base"], "empty": empty}, tmp_path / "cmp")


def test_read_jsonl_drops_torn_last_line_only(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(NanoError, match="line 2"):
        read_jsonl(path)


@pytest.mark.slow
def test_cli(runs, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "report", "distill", str(runs["base"]), str(runs["kd"]),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "KD vs CE: held-out perplexity −20.0%" in proc.stdout
    assert (out / "comparison.png").is_file() and (runs["base"] / "loss_curve.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "cli.main", "report", "distill", str(tmp_path / "nope"), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Error:" in bad.stderr and "metrics.jsonl" in bad.stderr
