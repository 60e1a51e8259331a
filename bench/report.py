"""Benchmark results side by side: bench.md (a table), bench.json and bench.png (size, perplexity, prefill and decode
charts). `nano bench --report DIR` writes one artifact (and llama.cpp, with --vs-gguf); `make demo` writes the
teacher, the student in float and the student at int4 together.

    nano report bench teacher=runs/demo/teacher.json student=runs/demo/student.json --out runs/demo/report
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nano.errors import NanoError
from nano.files import save_figure, write_text


def read_bench(path: str | Path) -> dict[str, dict]:
    """`nano bench --json` output (one result or a list of them), by artifact name without its suffix."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NanoError(f"{path} is not a `nano bench --json` result ({e})") from None
    results = results if isinstance(results, list) else [results]
    if not all(isinstance(r, dict) and "artifact" in r for r in results):
        raise NanoError(f"{path} is not a `nano bench --json` result (no artifact named in it)")
    return {Path(r["artifact"]).stem: r for r in results}


def rows(results: dict[str, dict]) -> list[dict]:
    """One row per result, and one per llama.cpp peer a result was measured against (once per GGUF)."""
    out, peers = [], set()
    for name, r in results.items():
        out.append({"name": name, **r})
        peer = r.get("peer")
        if peer is not None and peer["gguf"] not in peers:
            peers.add(peer["gguf"])
            out.append({"name": f"llama.cpp {Path(peer['gguf']).name}", "backend": "llama.cpp", **peer})
    return out


def _markdown(table: list[dict]) -> str:
    lengths = sorted({n for r in table for n in r["prefill_tokens_per_s"]}, key=int)
    head = ["", "backend", "MiB", "bits per byte", "perplexity", *(f"prefill {n} tok/s" for n in lengths),
            "decode tok/s", "first token ms", "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "–"
        ppl = f"{r['ppl']:.3f} ({r['ppl_tokens']:,} tokens)" if "ppl" in r else "–"
        prefill = [f"{r['prefill_tokens_per_s'][n]:,.0f}" if n in r["prefill_tokens_per_s"] else "–" for n in lengths]
        lines.append("| " + " | ".join([r["name"], r["backend"], f"{r['file_bytes'] / 2**20:,.1f}", bpb, ppl, *prefill,
                                        f"{r['decode_tokens_per_s']:,.1f}", f"{r['time_to_first_token_s'] * 1e3:,.0f}",
                                        f"{r['peak_rss_bytes'] / 2**30:.2f}"]) + " |")
    notes = []
    for r in table:
        if "ratios" in r:
            ratio = ", ".join(f"{k.replace('_', ' ')} {v:.2f}×" for k, v in r["ratios"].items())
            notes.append(f"- **{r['name']} / llama.cpp** (same threads, alternating runs): {ratio}.")
        if "decode_bytes_per_token" in r:
            notes.append(f"- **{r['name']}** reads {r['decode_bytes_per_token'] / 2**20:,.1f} MiB per decoded token "
                         f"(weights {r['weight_bytes'] / 2**20:,.1f}, KV cache {r['kv_cache_bytes'] / 2**20:,.1f}): "
                         f"{r['decode_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s at its decode rate, "
                         f"{r['decode_bandwidth_fraction']:.0%} of the {r['memory_bandwidth_bytes_per_s'] / 1e9:.1f} "
                         f"GB/s measured here; the bandwidth limit is {r['decode_tokens_per_s_limit']:,.1f} tokens/s.")
    threads = sorted({r["threads"] for r in table if "threads" in r})
    return "\n".join([*lines, "", f"Threads: {', '.join(map(str, threads))}. Medians over each result's repeats. "
                      "Bits per byte compare models whose vocabularies differ; perplexity is per token.", *notes]) + "\n"


def _bars(ax, names, values, label, color, fmt):
    bars = ax.barh(names, values, color=color)
    ax.bar_label(bars, [fmt.format(v) if v == v else "not measured" for v in values], padding=3, fontsize=8)
    ax.set_xlabel(label)
    ax.set_xlim(0, np.nanmax(values) * 1.35 if np.any(np.isfinite(values)) else 1)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def _plot(table: list[dict], path: Path) -> Path:
    names = [r["name"] for r in table]
    with_ppl = any("ppl" in r for r in table)
    quality = "bits_per_byte" if all("bits_per_byte" in r for r in table if "ppl" in r) else "ppl"
    fig = Figure(figsize=(12, (1.4 + 0.6 * len(table)) * (2 if with_ppl else 1)))
    axes = list(fig.subplots(2, 2).flat if with_ppl else fig.subplots(1, 3))
    size, prefill, decode = axes.pop(0), axes.pop(-2), axes.pop(-1)
    _bars(size, names, [r["file_bytes"] / 2**20 for r in table], "file size (MiB)", "tab:gray", "{:,.0f}")
    if with_ppl:
        values = [r.get(quality, np.nan) for r in table]
        label = "bits per byte" if quality == "bits_per_byte" else "perplexity"
        _bars(axes[0], names, values, f"{label} through the file (lower is better)", "tab:red", "{:.3f}")
        axes[0].tick_params(labelleft=False)
        if quality == "ppl" and np.nanmax(values) > 20 * np.nanmin(values):  # a random-init student and its teacher
            axes[0].set_xscale("log")
            axes[0].set_xlim(1, np.nanmax(values) * 5)
            axes[0].set_xlabel("perplexity through the file (log scale, lower is better)")
    lengths = sorted({n for r in table for n in r["prefill_tokens_per_s"]}, key=int)
    height = 0.8 / len(lengths)
    y = np.arange(len(table))
    for i, n in enumerate(lengths):
        values = [r["prefill_tokens_per_s"].get(n, np.nan) for r in table]
        bars = prefill.barh(y + i * height, values, height, label=f"{n} tokens")
        prefill.bar_label(bars, [f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    prefill.set_yticks(y + height * (len(lengths) - 1) / 2, names if with_ppl else [])
    prefill.set_xlim(0, max(max(r["prefill_tokens_per_s"].values()) for r in table) * 1.3)
    prefill.set_xlabel("prefill (tokens/s)")
    prefill.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=len(lengths), frameon=False)
    prefill.invert_yaxis()
    prefill.grid(axis="x", alpha=0.3)
    _bars(decode, names, [r["decode_tokens_per_s"] for r in table], "decode (tokens/s); black: bandwidth limit",
          "tab:blue", "{:,.1f}")
    for row, r in enumerate(table):
        if "decode_tokens_per_s_limit" in r:
            decode.plot([r["decode_tokens_per_s_limit"]] * 2, [row - 0.4, row + 0.4], color="black", lw=2)
    limits = [r.get("decode_tokens_per_s_limit", 0) for r in table] + [r["decode_tokens_per_s"] for r in table]
    decode.set_xlim(0, max(limits) * 1.3)
    decode.tick_params(labelleft=False)
    threads = sorted({r["threads"] for r in table if "threads" in r})
    fig.suptitle(f"nano bench, {', '.join(map(str, threads))} threads")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(results: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """bench.json (the results as given), bench.md and bench.png in OUT_DIR."""
    if not results:
        raise NanoError("no results to report")
    out_dir = Path(out_dir)
    table = rows(results)
    return [write_text(out_dir / "bench.json", json.dumps(results, indent=2)),
            write_text(out_dir / "bench.md", _markdown(table)), _plot(table, out_dir / "bench.png")]
