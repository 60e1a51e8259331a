"""Cut a teacher down to a student's shape: keep chosen layers, FFN neurons, query heads, embedding channels and
vocabulary rows, copying exactly the kept slices of every tensor (Minitron's structured pruning).

The student then starts as close to the teacher as its shape allows and heals by distillation. Everything here
works on flat float parameters (`nano.checkpoint.flat_params` form) and a `ModelConfig`, so a pruned model is an
ordinary model directory once saved.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from nano.checkpoint import check_params
from nano.config import ModelConfig
from nano.errors import NanoError

_D_ROWS = ("attn.q_proj.kernel", "attn.k_proj.kernel", "attn.v_proj.kernel", "mlp.gate.kernel", "mlp.up.kernel")
_D_COLS = ("attn.o_proj.kernel", "mlp.down.kernel")
_D_NORMS = ("attn_norm.scale", "post_attn_norm.scale", "mlp_norm.scale", "post_mlp_norm.scale")


def choose(scores, keep: int) -> list[int]:
    """The indices of the `keep` highest scores, sorted; ties keep the lower index."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or not np.all(np.isfinite(scores)):
        raise NanoError(f"scores must be a 1-D array of finite numbers, got shape {scores.shape}")
    if not 1 <= keep <= scores.size:
        raise NanoError(f"cannot keep {keep} of {scores.size}: keep between 1 and {scores.size}")
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:keep])


def choose_heads(head_scores, keep: int, kv_heads: int) -> list[int]:
    """The `keep` best query heads [H], `keep / kv_heads` from each KV group (a group's heads share one K and V,
    so every group must keep as many query heads as the others for the pruned model to stay grouped)."""
    head_scores = np.asarray(head_scores, np.float64)
    h = head_scores.size
    if kv_heads < 1 or h % kv_heads:
        raise NanoError(f"{h} query heads do not divide into {kv_heads} KV groups")
    if keep < 1 or keep % kv_heads or keep > h:
        raise NanoError(f"cannot keep {keep} of {h} query heads in {kv_heads} KV groups: keep a multiple of "
                        f"{kv_heads} up to {h}")
    group = h // kv_heads
    return [g * group + i for g in range(kv_heads) for i in choose(head_scores[g * group:(g + 1) * group],
                                                                   keep // kv_heads)]


def _indices(name: str, kept, size: int) -> np.ndarray:
    """`kept` checked: non-empty, sorted, unique, within [0, size)."""
    kept = np.asarray(kept)
    if kept.ndim != 1 or (kept.size and not np.issubdtype(kept.dtype, np.integer)):
        raise NanoError(f"{name} must be a list of integer indices")
    if kept.size == 0:
        raise NanoError(f"{name} keeps nothing: keep at least one")
    if kept.size > size:
        raise NanoError(f"{name} keeps {kept.size} but the teacher has only {size}")
    if kept[0] < 0 or kept[-1] >= size or np.any(np.diff(kept) <= 0):
        raise NanoError(f"{name} must be sorted, unique indices in [0, {size})")
    return kept.astype(np.int64)


def _per_layer(name: str, lists, size: int, layers: np.ndarray, num_layers: int) -> list[np.ndarray] | None:
    """Per-layer kept indices, one list per kept layer (given per kept layer or per teacher layer), equal counts."""
    if lists is None:
        return None
    if len(lists) == num_layers:
        lists = [lists[i] for i in layers]
    elif len(lists) != len(layers):
        raise NanoError(f"{name} needs one list per kept layer ({len(layers)}) or per teacher layer "
                        f"({num_layers}), got {len(lists)}")
    kept = [_indices(f"{name}[{i}]", k, size) for i, k in enumerate(lists)]
    if len({k.size for k in kept}) > 1:
        raise NanoError(f"{name} must keep the same count in every layer, got {sorted({k.size for k in kept})}")
    return kept


def _check_heads(kept: list[np.ndarray], config: ModelConfig) -> None:
    group = config.queries_per_kv_head
    for i, heads in enumerate(kept):
        counts = np.bincount(heads // group, minlength=config.num_kv_heads)
        if np.any(counts != counts[0]):
            raise NanoError(f"heads[{i}] keeps {counts.tolist()} query heads from the {config.num_kv_heads} KV groups "
                            f"({group} heads each): every group must keep the same number")


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _layer_params(params, teacher: int, new: int, ffn, heads, channels, head_dim: int) -> dict[str, np.ndarray]:
    """Layer `teacher`'s tensors under layer `new`'s names, with its FFN neurons, query heads and d_model channels
    cut (each None keeps all)."""
    p = {name[len(f"layers.{teacher}."):]: value for name, value in params.items()
         if name.startswith(f"layers.{teacher}.")}
    if ffn is not None:
        p["mlp.gate.kernel"], p["mlp.up.kernel"] = p["mlp.gate.kernel"][:, ffn], p["mlp.up.kernel"][:, ffn]
        p["mlp.down.kernel"] = p["mlp.down.kernel"][ffn]
    if heads is not None:
        cols = _head_columns(heads, head_dim)
        p["attn.q_proj.kernel"] = p["attn.q_proj.kernel"][:, cols]
        p["attn.o_proj.kernel"] = p["attn.o_proj.kernel"][cols]
    if channels is not None:
        p.update({k: p[k][channels] for k in _D_ROWS + _D_NORMS})
        p.update({k: p[k][:, channels] for k in _D_COLS})
    return {f"layers.{new}.{name}": np.array(value) for name, value in p.items()}


def prune_params(config: ModelConfig, params: dict[str, np.ndarray], *, layers: Sequence[int] | None = None,
                 ffn: Sequence[Sequence[int]] | None = None, heads: Sequence[Sequence[int]] | None = None,
                 channels: Sequence[int] | None = None, vocab: Sequence[int] | None = None,
                 ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(student config, student params): the teacher's with only the kept indices along each axis.

    `layers`: kept teacher layers; `ffn` / `heads`: per kept layer (or per teacher layer) the kept FFN neurons /
    query heads, the same count in every layer, heads evenly from each KV group (K and V stay whole, as do the
    per-head_dim q/k norms); `channels`: kept d_model channels (an even count); `vocab`: kept token ids (rows of
    the tied embedding). None keeps everything along that axis.
    """
    check_params(config, params, source="teacher parameters")
    if any(not np.issubdtype(np.asarray(v).dtype, np.floating) for v in params.values()):
        raise NanoError("pruning needs float parameters (dequantize a quantized model first)")
    kept_layers = _indices("layers", range(config.num_layers) if layers is None else layers, config.num_layers)
    ffn_kept = _per_layer("ffn", ffn, config.ffn_dim, kept_layers, config.num_layers)
    head_kept = _per_layer("heads", heads, config.num_heads, kept_layers, config.num_layers)
    if head_kept is not None:
        _check_heads(head_kept, config)
    ch = None if channels is None else _indices("channels", channels, config.d_model)
    if ch is not None and ch.size % 2:
        raise NanoError(f"channels must keep an even d_model, got {ch.size}")
    rows = None if vocab is None else _indices("vocab", vocab, config.vocab_size)

    new = {}
    for j, i in enumerate(kept_layers):
        new.update(_layer_params(params, int(i), j, None if ffn_kept is None else ffn_kept[j],
                                 None if head_kept is None else head_kept[j], ch, config.head_dim))
    embedding = np.asarray(params["embedder.embedding"])
    final_scale = np.asarray(params["final_norm.scale"])
    if rows is not None:
        embedding = embedding[rows]
    if ch is not None:
        # The lookup multiplies a row by sqrt(width of the table): sqrt(d_new) for the pruned table where the
        # teacher used sqrt(d_old). Scaling the kept columns by c = sqrt(d_old / d_new) makes the pruned lookup
        # equal the teacher's kept channels exactly. The table is also the (tied) head, so its logits would grow
        # by c: dividing final_norm.scale by c cancels that, and the logits are the teacher's kept-channel terms,
        # save that final_norm now normalises by the RMS of fewer channels (as every RMSNorm does: healing's job).
        c = math.sqrt(config.d_model / ch.size)
        embedding = embedding[:, ch] * np.asarray(c, embedding.dtype)
        final_scale = final_scale[ch] / np.asarray(c, final_scale.dtype)
    new["embedder.embedding"], new["final_norm.scale"] = np.array(embedding), np.array(final_scale)

    new_config = dataclasses.replace(
        config, num_layers=int(kept_layers.size),
        ffn_dim=config.ffn_dim if ffn_kept is None else int(ffn_kept[0].size),
        num_heads=config.num_heads if head_kept is None else int(head_kept[0].size),
        d_model=config.d_model if ch is None else int(ch.size),
        vocab_size=config.vocab_size if rows is None else int(rows.size),
        layer_kinds=tuple(config.layer_types[i] for i in kept_layers))
    check_params(new_config, new, source="pruned parameters")
    total = sum(v.size for v in new.values())
    if total != new_config.param_count:
        raise NanoError(f"pruned parameters hold {total} values but the config counts {new_config.param_count}")
    return new_config, new
