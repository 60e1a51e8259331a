"""prune.png: the importance scores a pruning measured, with what it kept, one panel per axis it cut."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure


def _depth(ax, scores, kept):
    influence, drop = np.asarray(scores["block_influence"]), np.asarray(scores["drop_nll"])
    x = np.arange(len(drop))
    ax.bar(x - 0.2, drop, 0.4, label="loss without the layer (nats/token)", color="tab:red")
    twin = ax.twinx()
    twin.bar(x + 0.2, influence, 0.4, label="block influence 1 − cos(in, out)", color="tab:blue")
    cut = [i for i in x if i not in set(kept or [])]
    ax.plot(cut, np.zeros(len(cut)), "kx", markersize=9, label="cut")
    ax.set_xticks(x)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("loss increase (nats/token)")
    twin.set_ylabel("block influence")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    ax.set_title("depth")


def _sorted(ax, values, keep: int | None, label: str, title: str):
    """Each row of `values` sorted high to low (one line per layer), and where the cut falls."""
    values = np.atleast_2d(np.asarray(values))
    for row in values:
        ax.plot(np.sort(row)[::-1], alpha=0.6, linewidth=1)
    if keep is not None:
        ax.axvline(keep - 0.5, color="k", linestyle="--", label=f"kept: {keep}")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"{label}, by importance")
    ax.set_ylabel("importance")
    ax.set_title(title)


def _vocabulary(ax, counts, record):
    counts = np.sort(np.asarray(counts))[::-1]
    total = record["calibration"]["teacher_tokens"]
    ax.plot(np.arange(1, len(counts) + 1), np.cumsum(counts) / max(total, 1))
    ax.set_xscale("log")
    ax.set_xlabel("kept pieces, most used first")
    ax.set_ylabel("calibration tokens covered")
    ax.set_title(f"vocabulary: {len(counts):,} pieces cover {record['calibration']['coverage']:.2%}")


def plot_scores(record: dict) -> bytes:
    """The PNG of prune.json's `record`: one panel per axis that was measured."""
    scores, kept, settings = record["scores"], record["kept"], record["settings"]
    panels = []
    if "drop_nll" in scores:
        panels.append(lambda ax: _depth(ax, scores, kept.get("layers")))
    if "ffn" in scores:
        panels.append(lambda ax: _sorted(ax, scores["ffn"], settings["ffn_dim"], "FFN neurons", "FFN, per layer"))
        panels.append(lambda ax: _sorted(ax, scores["heads"], settings["num_heads"], "query heads",
                                         "attention heads, per layer"))
        panels.append(lambda ax: _sorted(ax, scores["channels"], settings["d_model"], "embedding channels",
                                         "embedding channels"))
    if "vocab_counts" in scores:
        panels.append(lambda ax: _vocabulary(ax, scores["vocab_counts"], record))
    fig = Figure(figsize=(12, 3.6 * max(1, -(-len(panels) // 2))), layout="constrained")
    axes = np.atleast_1d(fig.subplots(max(1, -(-len(panels) // 2)), 2)).reshape(-1)
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0].text(0.5, 0.5, "nothing pruned: the student is the teacher", ha="center", va="center")
    student, teacher = record["student"]["params"], record["teacher"]["params"]
    fig.suptitle(f"{record['teacher']['model']} → {student:,} parameters ({student / teacher:.0%} of the teacher)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
