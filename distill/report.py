"""Plots and comparison tables for distillation runs.

    plot_run(run_dir)                     -> run_dir/loss_curve.png
    compare_runs({"ce": dir_a, "fkl": dir_b}, out_dir)
        -> out_dir/comparison.json, comparison.md, comparison.png; returns the comparison dict
    nano report distill RUN_A RUN_B --out DIR

A run directory holds `metrics.jsonl` (one line per optimizer step), `eval.jsonl` (one line per evaluation:
{"step", **Evaluator result}, optionally "tokens_seen") and, once finished, `report.json` (final_eval, tokens_seen,
loss_kind, optional text_ppl {name: ppl}). Tokens seen at a step is the running sum of the metrics' `tokens` (the
scored tokens of each step); an eval line's own "tokens_seen" wins when present. Files are written under a
temporary name and renamed, so a reader never sees half a PNG or JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from distill.settings import EVAL_FILE, METRICS_FILE, REPORT_FILE
from nano.errors import NanoError
from nano.files import save_figure, write_text


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file. A torn last line (a run killed mid-write) is dropped; a bad line elsewhere
    is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise NanoError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
    return records


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise NanoError(f"{run_dir} has no {METRICS_FILE}: not a distillation run directory, or it has not "
                        "finished a step yet")
    records = read_jsonl(path)
    if not records:
        raise NanoError(f"{path} is empty: the run has not finished a step yet")
    return records


def _evals(run_dir: Path) -> list[dict]:
    path = run_dir / EVAL_FILE
    return read_jsonl(path) if path.is_file() else []


def _cumulative_tokens(metrics: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, tokens seen after each step): the loop's `tokens_seen`, else summed per-step `tokens`."""
    steps = np.array([m["step"] for m in metrics], np.float64)
    if all("tokens_seen" in m for m in metrics):
        return steps, np.array([m["tokens_seen"] for m in metrics], np.float64)
    per_step = [m.get("tokens", m.get("tokens_per_s", 0.0) * m.get("seconds", 0.0)) for m in metrics]
    return steps, np.cumsum(np.array(per_step, np.float64))


def _eval_points(run_dir: Path, metrics: list[dict] | None) -> tuple[list[float], list[float], list[float]]:
    """(steps, tokens seen, held-out ppl) of the run's evaluations."""
    steps, seen, ppl = [], [], []
    cum_steps, cum_tokens = _cumulative_tokens(metrics) if metrics else (np.zeros(0), np.zeros(0))
    for e in _evals(run_dir):
        if "heldout_ppl" not in e:
            continue
        if "tokens_seen" in e:
            tokens = float(e["tokens_seen"])
        else:  # the running total after the last logged step at or before the eval's step
            i = np.searchsorted(cum_steps, e["step"], side="right") - 1
            tokens = float(cum_tokens[i]) if i >= 0 else 0.0
        steps.append(float(e["step"]))
        seen.append(tokens)
        ppl.append(float(e["heldout_ppl"]))
    return steps, seen, ppl


def plot_run(run_dir: str | Path) -> Path:
    """run_dir/loss_curve.png: loss, CE and KD against step; held-out perplexity (log scale) below."""
    run_dir = Path(run_dir)
    metrics = _metrics(run_dir)
    steps, seen = _cumulative_tokens(metrics)
    fig = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for key in ("loss", "ce", "kd"):
        values = np.array([m.get(key, np.nan) for m in metrics], np.float64)
        if np.nansum(np.abs(values)) > 0:  # a CE-only run logs kd = 0: leave it out
            top.plot(steps, values, label=key)
    top.set_ylabel("training loss (nats/token)")
    top.legend()
    top.grid(alpha=0.3)
    e_steps, _, e_ppl = _eval_points(run_dir, metrics)
    if e_ppl:
        bottom.plot(e_steps, e_ppl, "o-", label="held-out perplexity")
        bottom.set_yscale("log")
        bottom.legend()
    else:
        bottom.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("held-out perplexity")
    bottom.set_xlabel(f"step ({int(seen[-1]):,} tokens seen by step {int(steps[-1])})")
    bottom.grid(alpha=0.3, which="both")
    fig.suptitle(run_dir.resolve().name)
    return save_figure(fig, run_dir / "loss_curve.png")


def _report(run_dir: Path) -> dict:
    path = run_dir / REPORT_FILE
    if not path.is_file():
        raise NanoError(f"{run_dir} has no {REPORT_FILE}: the run has not finished")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoError(f"{path} is not JSON ({e.msg})") from None
    missing = [k for k in ("final_eval", "tokens_seen", "loss_kind") if k not in report]
    if missing or "heldout_ppl" not in report.get("final_eval", {}):
        raise NanoError(f"{path} lacks {', '.join(missing) or 'final_eval.heldout_ppl'}")
    return report


def _percent(change: float) -> str:
    return f"{'−' if change < 0 else '+'}{abs(change) * 100:.1f}%"


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def compare_runs(runs: dict[str, str | Path], out_dir: str | Path) -> dict:
    """Compare finished runs (name → run directory); writes comparison.json/.md/.png under out_dir and returns the
    comparison: {"runs": {name: figures and, when a "ce" run exists, changes vs it}, "ce_run", "summary"}."""
    if not runs:
        raise NanoError("no runs to compare")
    out_dir = Path(out_dir)
    rows = {}
    for name, run_dir in runs.items():
        report = _report(Path(run_dir))
        final = report["final_eval"]
        rows[name] = {"dir": str(run_dir), "loss_kind": report["loss_kind"], "tokens_seen": int(report["tokens_seen"]),
                      "heldout_ppl": final["heldout_ppl"], "heldout_nll": final.get("heldout_nll"),
                      "teacher_student_top1": final.get("teacher_student_top1"),
                      "kl_teacher_student": final.get("kl_teacher_student"),
                      "heldout_bits_per_byte": final.get("bits_per_byte"),
                      "text_ppl": dict(report.get("text_ppl") or {}),
                      "text_bits_per_byte": dict(report.get("text_bits_per_byte") or {})}
    ce_run = next((n for n, r in rows.items() if r["loss_kind"] == "ce"), None)
    summary = []
    if ce_run is not None:
        ce = rows[ce_run]
        for name, row in rows.items():
            if name == ce_run:
                continue
            row["heldout_ppl_change_vs_ce"] = row["heldout_ppl"] / ce["heldout_ppl"] - 1.0
            row["text_ppl_change_vs_ce"] = {t: p / ce["text_ppl"][t] - 1.0 for t, p in row["text_ppl"].items()
                                            if t in ce["text_ppl"]}
            at = (f"at equal tokens ({ce['tokens_seen']:,})" if row["tokens_seen"] == ce["tokens_seen"]
                  else f"at {row['tokens_seen']:,} vs {ce['tokens_seen']:,} tokens")
            summary.append(f"KD vs CE: held-out perplexity {_percent(row['heldout_ppl_change_vs_ce'])} {at} "
                           f"— {name} ({row['loss_kind']}) vs {ce_run} (ce)")
            if row["heldout_bits_per_byte"] and ce["heldout_bits_per_byte"]:
                row["heldout_bits_per_byte_change_vs_ce"] = row["heldout_bits_per_byte"] / ce["heldout_bits_per_byte"] - 1
                summary.append(f"KD vs CE: held-out bits per byte {_percent(row['heldout_bits_per_byte_change_vs_ce'])}"
                               f" — {name} vs {ce_run}")
    comparison = {"runs": rows, "ce_run": ce_run, "summary": summary}
    write_text(out_dir / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    write_text(out_dir / "comparison.md", _markdown(rows, summary))
    _plot_comparison(runs, out_dir / "comparison.png")
    return comparison


def _markdown(rows: dict, summary: list[str]) -> str:
    texts = sorted({t for r in rows.values() for t in r["text_ppl"]})
    header = ["run", "loss", "tokens", "held-out ppl", "held-out bits/byte", *(f"ppl {t}" for t in texts),
              *(f"bits/byte {t}" for t in texts), "top-1 agreement", "KL(teacher‖student)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, r["loss_kind"], f"{r['tokens_seen']:,}", f"{r['heldout_ppl']:.3f}",
                 _cell(r.get("heldout_bits_per_byte"), ".4f"), *(_cell(r["text_ppl"].get(t), ".3f") for t in texts),
                 *(_cell(r.get("text_bits_per_byte", {}).get(t), ".4f") for t in texts),
                 _cell(r["teacher_student_top1"], ".3f"), _cell(r["kl_teacher_student"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + summary) + "\n"


def _plot_comparison(runs: dict[str, str | Path], path: Path) -> Path:
    """Held-out perplexity against tokens seen, one line per run; a run without eval.jsonl shows its final point."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, run_dir in runs.items():
        run_dir = Path(run_dir)
        metrics = _metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else None
        _, seen, ppl = _eval_points(run_dir, metrics)
        if not ppl:
            report = _report(run_dir)
            seen, ppl = [report["tokens_seen"]], [report["final_eval"]["heldout_ppl"]]
        ax.plot(seen, ppl, "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("held-out perplexity")
    return save_figure(fig, path)
