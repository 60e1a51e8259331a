"""How much a quantized model lost: perplexity (the `nano perplexity` protocol) of the float and the quantized
model on the same windows, KL(float ‖ quantized) and top-1 agreement per token, bits per weight and size; and
quantized model directories compared side by side (`nano report quantize DIR... --out OUT`).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from nano.checkpoint import load_config, load_quant_info, param_shapes
from nano.errors import NanoError
from nano.files import directory_bytes, save_figure, write_text
from nano.quant_io import weight_bits


def quantization_loss(float_model, quant_model, tokenizer, text: str, *, window: int = 512,
                      batch_size: int = 4) -> dict:
    """The quantized model against its float source on `text`: both perplexities, KL(float ‖ quantized), top-1."""
    from nano.evaluate import Evaluator
    from nano.perplexity import window_batches

    batches = window_batches(tokenizer, text, window=window, batch_size=batch_size)
    base = Evaluator(batches)(float_model)
    quant = Evaluator(batches, teacher_model=float_model)(quant_model)
    return {"float_ppl": base["heldout_ppl"], "quant_ppl": quant["heldout_ppl"],
            "ppl_increase": quant["heldout_ppl"] - base["heldout_ppl"],
            "ppl_increase_pct": 100 * (quant["heldout_ppl"] / base["heldout_ppl"] - 1),
            "kl": quant["kl_teacher_student"], "top1_agreement": quant["teacher_student_top1"],
            "tokens": quant["heldout_tokens"], "window": window}


def size_report(config, quant_info: dict | None, directory: Path | None = None) -> dict:
    report = weight_bits(quant_info, param_shapes(config))
    if directory is not None:
        report["bytes_on_disk"] = directory_bytes(directory)
    return report


COLUMNS = ("model", "method", "scheme", "bits/weight", "bits/linear weight", "MiB on disk", "float ppl",
           "quantized ppl", "ppl increase", "KL", "top-1")


def _row(directory: Path) -> dict:
    info = load_quant_info(directory)
    if info is None or "report" not in info:
        raise NanoError(f"{directory} is not a quantized model directory with a report (run `nano quantize` "
                        "without --no-eval)")
    return {"model": directory.name, "method": info["method"], "scheme": info["scheme"],
            **size_report(load_config(directory), info, directory), **info["report"]}


def compare_directories(directories: list[str | Path], out_dir: str | Path) -> list[dict]:
    """One row per quantized model directory (its quant.json report and sizes), written to out_dir as
    comparison.json, comparison.md and comparison.png; returns the rows."""
    rows = [_row(Path(d)) for d in directories]
    out_dir = Path(out_dir)
    write_text(out_dir / "comparison.json", json.dumps(rows, indent=2))
    write_text(out_dir / "comparison.md", _markdown(rows))
    _plot(rows, out_dir / "comparison.png")
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["model"], r["method"], r["scheme"], f"{r['bits_per_weight']:.3f}",
                 f"{r['bits_per_linear_weight']:.3f}", f"{r['bytes_on_disk'] / 2**20:,.1f}", f"{r['float_ppl']:.4f}",
                 f"{r['quant_ppl']:.4f}", f"{r['ppl_increase_pct']:+.2f}%", f"{r['kl']:.4f}",
                 f"{r['top1_agreement']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = rows[0].get("text", "") if rows else ""
    return "\n".join(lines) + f"\n\nPerplexity with the `nano perplexity` protocol on {text}; KL(float ‖ quantized) " \
                              "and top-1 agreement per scored token.\n"


def _plot(rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(9, 4.5))
    ax_ppl, ax_kl = fig.subplots(1, 2)
    names = [r["model"] for r in rows]
    ax_ppl.barh(names, [r["ppl_increase_pct"] for r in rows], color="tab:red")
    ax_ppl.set_xlabel("perplexity increase over float (%)")
    ax_kl.barh(names, [r["kl"] for r in rows], color="tab:blue")
    ax_kl.set_xlabel("KL(float ‖ quantized) per token (nats)")
    ax_kl.tick_params(labelleft=False)
    for ax in (ax_ppl, ax_kl):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"int4 weights against the float model ({rows[0]['float_ppl']:.3f} ppl)" if rows else "")
    fig.tight_layout()
    return save_figure(fig, path)
