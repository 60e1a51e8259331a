"""Students beside their teacher: what each model costs and how good it is, in one table and one chart.

    rows = compare_students({"teacher": "gemma3-270m", "kd": "runs/kd/final"}, texts=["heldout.txt", "LICENSE.txt"],
                            bench=results, out_dir="runs/distill/students")

For each model: its parameters, bits per byte of the float model on each text (the `nano perplexity` protocol;
bits per byte, unlike perplexity, compare models whose vocabularies differ), and from `nano bench --json` results
(the artifact named after the model: `kd.litertlm` for "kd") the artifact's file size, prefill and decode speed,
measured in one alternating run. The first model is the reference the others are divided by (the teacher).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nano.errors import NanoError
from nano.files import read_text, save_figure, write_text
from nano.ui import status


def _row(name: str, model: str, bench: dict, texts: dict[str, str]) -> dict:
    from nano.perplexity import perplexity
    from nano.resolve import load_model

    with status(f"scoring {name} ({model}) on {', '.join(texts)}"):
        net, tokenizer = load_model(model)
        bpb = {text_name: perplexity(net, tokenizer, text).bits_per_byte for text_name, text in texts.items()}
    row = {"name": name, "model": str(model), "params": net.config.param_count,
           "vocab_size": net.config.vocab_size, "layers": net.config.num_layers, "bits_per_byte": bpb}
    if bench:
        row.update(artifact=bench["artifact"], file_bytes=bench["file_bytes"],
                   prefill_tokens_per_s=bench["prefill_tokens_per_s"], decode_tokens_per_s=bench["decode_tokens_per_s"],
                   threads=bench["threads"], backend=bench["backend"])
    return row


def compare_students(models: dict[str, str], *, texts: list[str], out_dir: str | Path,
                     bench: dict[str, dict] | None = None) -> list[dict]:
    """The rows (see the module docstring), also written to out_dir as students.json, students.md, students.png.
    `bench`: bench results by artifact name (`bench.report.read_bench`)."""
    if not models:
        raise NanoError("no models to compare")
    named = {Path(t).name: read_text(t) for t in texts}
    rows = [_row(name, model, (bench or {}).get(name, {}), named) for name, model in models.items()]
    reference = rows[0]
    for row in rows:
        row["params_vs_reference"] = row["params"] / reference["params"]
        row["bits_per_byte_vs_reference"] = {t: b / reference["bits_per_byte"][t]
                                             for t, b in row["bits_per_byte"].items()}
        if "decode_tokens_per_s" in row and "decode_tokens_per_s" in reference:
            row["decode_vs_reference"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
            row["prefill_vs_reference"] = {n: v / reference["prefill_tokens_per_s"][n]
                                           for n, v in row["prefill_tokens_per_s"].items()
                                           if n in reference["prefill_tokens_per_s"]}
    out_dir = Path(out_dir)
    write_text(out_dir / "students.json", json.dumps(rows, indent=2) + "\n")
    write_text(out_dir / "students.md", _markdown(rows, list(named)))
    _plot(rows, list(named), out_dir / "students.png")
    return rows


def _markdown(rows: list[dict], texts: list[str]) -> str:
    lengths = sorted({n for r in rows for n in r.get("prefill_tokens_per_s", {})}, key=int)
    head = ["", "parameters", *(f"bits/byte {t}" for t in texts), "int4 MiB",
            *(f"prefill {n} tok/s" for n in lengths), "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bpb = [f"{r['bits_per_byte'][t]:.4f} (×{r['bits_per_byte_vs_reference'][t]:.3f})" for t in texts]
        speed = [f"{r['prefill_tokens_per_s'][n]:,.0f} (×{r['prefill_vs_reference'][n]:.2f})"
                 if n in r.get("prefill_vs_reference", {}) else "–" for n in lengths]
        decode = (f"{r['decode_tokens_per_s']:,.1f} (×{r['decode_vs_reference']:.2f})"
                  if "decode_vs_reference" in r else "–")
        size = f"{r['file_bytes'] / 2**20:,.1f}" if "file_bytes" in r else "–"
        lines.append("| " + " | ".join([r["name"], f"{r['params'] / 1e6:,.1f}M (×{r['params_vs_reference']:.3f})",
                                        *bpb, size, *speed, decode]) + " |")
    benched = [r for r in rows if "threads" in r]
    where = (f" The artifacts ran in the {benched[0]['backend']} backend on {benched[0]['threads']} threads, "
             "each bench's median; × is against the first row.") if benched else ""
    return "\n".join(lines) + f"\n\nBits per byte of the float model on each text (lower is better).{where}\n"


def _plot(rows: list[dict], texts: list[str], path: Path) -> Path:
    fig = Figure(figsize=(12, 1.6 + 0.7 * len(rows)), layout="constrained")
    quality, speed = fig.subplots(1, 2)
    names, y = [r["name"] for r in rows], np.arange(len(rows))
    height = 0.8 / max(len(texts), 1)
    for i, text in enumerate(texts):
        values = [r["bits_per_byte"][text] for r in rows]
        bars = quality.barh(y + i * height, values, height, label=text)
        quality.bar_label(bars, [f"{v:.3f}" for v in values], padding=3, fontsize=8)
    quality.set_yticks(y + height * (len(texts) - 1) / 2, names)
    quality.set_xlabel("bits per byte (lower is better)")
    quality.legend(fontsize=8)
    decode = [r.get("decode_tokens_per_s", np.nan) for r in rows]
    bars = speed.barh(y, decode, color="tab:blue")
    speed.bar_label(bars, [f"{v:,.1f}" if v == v else "not benched" for v in decode], padding=3, fontsize=8)
    speed.set_yticks(y, [])
    speed.set_xlabel("int4 decode (tokens/s, higher is better)")
    for ax in (quality, speed):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    params = ", ".join(f"{r['name']} {r['params'] / 1e6:,.0f}M" for r in rows)
    fig.suptitle(f"students beside their teacher ({params} parameters)")
    return save_figure(fig, path)
