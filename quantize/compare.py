"""Compare quantized model directories (their quant.json reports) in one table and one chart.

    python -m quantize.compare runs/quant/rtn-b32 runs/quant/gptq-b32 ... --out runs/quant
        -> runs/quant/comparison.md, comparison.json, comparison.png
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from matplotlib.figure import Figure

from distill.report import _atomic_write, _save_figure
from nano.checkpoint import load_config, load_quant_info
from nano.errors import NanoError
from quantize.report import size_report

COLUMNS = ("model", "method", "scheme", "bits/weight", "bits/linear weight", "MiB on disk", "float ppl",
           "quantized ppl", "ppl increase", "KL", "top-1")


def _row(directory: Path) -> dict:
    info = load_quant_info(directory)
    if info is None or "report" not in info:
        raise NanoError(f"{directory} is not a quantized model directory with a report (run `nano quantize` "
                        "without --no-eval)")
    return {"model": directory.name, "method": info["method"], "scheme": info["scheme"],
            **size_report(load_config(directory), info, directory), **info["report"]}


def compare(directories: list[Path], out_dir: Path) -> list[dict]:
    rows = [_row(Path(d)) for d in directories]
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "comparison.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=2)))
    _atomic_write(out_dir / "comparison.md", lambda tmp: tmp.write_text(_markdown(rows)))
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
    return _save_figure(fig, path)


@click.command()
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Where the comparison goes.")
def main(directories: tuple[Path, ...], out_dir: Path) -> None:
    """Compare quantized model DIRECTORIES in OUT (comparison.md, .json, .png)."""
    try:
        compare(list(directories), out_dir)
    except NanoError as e:
        raise click.ClickException(str(e)) from None
    click.echo((out_dir / "comparison.md").read_text(), nl=False)


if __name__ == "__main__":
    main()
