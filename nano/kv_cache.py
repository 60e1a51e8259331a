"""The KV cache: its layout (keys, values transposed; a window-long ring for a sliding-window layer), and how a chunk
of keys and values is written into it and which slots its queries then attend over. nano.model's attention is its
one user; the export hands the same caches to the LiteRT-LM engine, so what is written here is what a phone runs.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nano.config import GLOBAL, ModelConfig

# The slot (sequence) axis of each cache, from the end: keys [.., S, hd], values [.., hd, S].
SLOT_AXIS = {"k": -2, "v": -1}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: keys [batch, kv_heads, slots, head_dim], values [batch, kv_heads, head_dim,
    slots].

    Values are stored transposed (litert-torch's KV_LAYOUT_TRANSPOSED): both attention matmuls then read their
    cache as a [free, contracted] right operand, the layout whose packing the LiteRT-LM engine's XNNPACK does with
    vector copies (the other one it packs with scalar code: 20% of a decoded token, measured). A cache of one
    sequence may also come without its unit leading axes (batch, and kv_heads when there is one): the export's,
    whose matmuls then read the cache buffers as they are, with no reshape between them (which XNNPACK executes as
    a copy of the whole cache on every step).

    A global layer's cache is as long as the context: position p lives in slot p. A local layer needs only its
    window, so `zeros` gives it at most that many slots, as a ring: position p in slot p % slots.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, *, dtype=jnp.float32) -> "KVCache":
        def slots(layer_type):
            return length if layer_type == GLOBAL else min(length, config.sliding_window)

        def zeros(keys: bool):  # distinct buffers, so a jitted step may donate (update in place) each of them
            kvh, hd = config.num_kv_heads, config.head_dim
            return tuple(jnp.zeros((batch, kvh, slots(t), hd) if keys else (batch, kvh, hd, slots(t)), dtype)
                         for t in config.layer_types)

        return cls(k=zeros(True), v=zeros(False))

    @property
    def length(self) -> int:
        """The context the cache holds: its longest (global) ring."""
        return max(v.shape[SLOT_AXIS["v"]] for v in self.v)


def ring_positions(last: jax.Array, slots: int) -> jax.Array:
    """The position each ring slot holds once positions ..last have been written: [B] → [B, slots] (< 0: empty)."""
    j = jnp.arange(slots)
    return last[:, None] - jnp.mod(last[:, None] - j, slots)


def cached_keys(kv, k, vt, positions, *, ring: bool):
    """Write a chunk into a layer's cache and say which keys its queries attend over.

    k [B, KVH, T, hd] and vt [B, KVH, hd, T] are the chunk's keys and values (transposed, as the cache holds them),
    at positions [B, T] that count up from positions[:, 0]. Rows whose position breaks that count are padding
    (LiteRT-LM pads a short last prefill chunk with position 0): they are neither attended to nor written. Returns
    (keys [.., S', hd], values [.., hd, S'] in the cache's leading axes, key positions [B, S'], key valid
    [B, S'], new cache).
    """
    if ring:
        return _ring_keys(kv, k, vt, positions)
    return _linear_keys(kv, k, vt, positions)


def _batched(cache) -> bool:
    """Whether a cache has its batch axis (one of a single sequence may not: see KVCache)."""
    return cache.ndim == 4 and cache.shape[0] > 1


def _like_cache(x, cache):
    """A chunk [B, KVH, a, b] in the cache's leading axes (the same, or without the unit ones the cache drops)."""
    return x.reshape(cache.shape[:-2] + x.shape[-2:])


def _write_one(cache, x, slot, axis):
    """cache with x (one slot's worth: size 1 on `axis`) written at slot [B] along `axis` (from the end)."""
    x, axis = _like_cache(x, cache), cache.ndim + axis
    if not _batched(cache):  # a plain dynamic-update-slice (a batched one exports as a scatter)
        return jax.lax.dynamic_update_slice_in_dim(cache, x, slot[0], axis=axis)
    return jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=axis - 1))(cache, x, slot)


def _rows_over(x, rows, held, axis):
    """held with x's row rows[i] (along `axis`, the slot axis of both) at i wherever rows[i] >= 0. The rows are
    gathered in x's dtype and then stored in held's (TFLite gathers no float16)."""
    keep = [1] * held.ndim
    keep[axis] = rows.shape[0]
    new = jnp.take(x, jnp.clip(rows, 0, x.shape[axis] - 1), axis=axis)
    return jnp.where((rows >= 0).reshape(keep), new.astype(held.dtype), held)


def _write_rows(cache, x, slot_rows, axis):
    """cache with x's rows (along `axis` from the end, the slot axis of both) written where slot_rows [B, S] says
    (a row index into x's T rows, or < 0: keep)."""
    x, axis = _like_cache(x, cache), cache.ndim + axis
    if not _batched(cache):
        return _rows_over(x, slot_rows[0], cache, axis)
    return jax.vmap(lambda held, rows_of, rows: _rows_over(rows_of, rows, held, axis - 1))(cache, x, slot_rows)


def _write_chunk(kv, k, vt, slot_rows):
    """Both caches with the chunk's rows written where slot_rows [B, S] says (see _write_rows): a batch's chunk, or
    one as long as a ring (one sequence's shorter chunks: _write_chunk_in_spans)."""
    return _write_rows(kv[0], k, slot_rows, SLOT_AXIS["k"]), _write_rows(kv[1], vt, slot_rows, SLOT_AXIS["v"])


def _write_span(cache, x, at, rows, axis):
    """cache with the len(rows) slots from slot `at` (along `axis` from the end) rewritten by one dynamic-update-slice:
    slot at+i takes x's row rows[i], or keeps what it holds where rows[i] < 0. The span must lie inside the cache:
    a dynamic-update-slice moves a span that does not (its start clamped), and its rows with it."""
    x, axis = _like_cache(x, cache), cache.ndim + axis
    held = jax.lax.dynamic_slice_in_dim(cache, at, rows.shape[0], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(cache, _rows_over(x, rows, held, axis), at, axis=axis)


def _write_chunk_in_spans(kv, k, vt, start, last, *, ring: bool):
    """Both caches of one sequence with its chunk's rows start..last (k [.., T, hd], vt [.., hd, T]) written by
    dynamic-update-slices of T slots (see _write_span): T rows of cache work where selecting over the whole cache
    (_write_chunk) costs all of it, which the LiteRT-LM engine paid on every prefill, most of a short prompt's time.

    The span ends at the last row's slot, so in a cache as long as the context it never reaches past the context,
    whatever length the engine gives the cache (no clamp moves it), and the slots before the chunk keep their rows.
    In a ring (longer than the chunk) those T slots wrap past its end at most once: a second span, ending at the
    ring's end, covers the rest (where the two overlap, the second rewrites what the first wrote)."""
    t, slots = k.shape[-2], kv[1].shape[SLOT_AXIS["v"]]
    end, written = last[0], last[0] - start[0] + 1
    if ring:
        end = jnp.mod(end, slots)
    spans = [jnp.maximum(end + 1 - t, 0)] + ([jnp.asarray(slots - t)] if ring else [])
    cache_k, cache_v = kv
    for at in spans:
        back = end - (at + jnp.arange(t))  # how many slots before the last row's each slot of the span lies
        if ring:
            back = jnp.mod(back, slots)
        rows = jnp.where((back >= 0) & (back < written), written - 1 - back, -1)
        cache_k = _write_span(cache_k, k, at, rows, SLOT_AXIS["k"])
        cache_v = _write_span(cache_v, vt, at, rows, SLOT_AXIS["v"])
    return cache_k, cache_v


def _write_token(kv, k, vt, slot):
    """Both caches with one token's key k [B, KVH, 1, hd] and value vt [B, KVH, hd, 1] written at slot [B]."""
    return (_write_one(kv[0], k.astype(kv[0].dtype), slot, SLOT_AXIS["k"]),
            _write_one(kv[1], vt.astype(kv[1].dtype), slot, SLOT_AXIS["v"]))


def _linear_keys(kv, k, vt, positions):
    """A cache as long as the context (a global layer's, or a local one's shorter than its window): position p
    in slot p. The chunk is written first and the queries attend over the whole cache. Nothing here depends on
    the cache's length but its shape, so an exported artifact's context can be chosen when it loads (LiteRT
    rewrites shapes there; a constant computed from the length, such as a modulus, it would leave as it was)."""
    t, slots = positions.shape[1], kv[1].shape[SLOT_AXIS["v"]]
    start = positions[:, 0]
    j = jnp.arange(slots)[None, :]  # [1, S]
    if t == 1:
        last = start
        new_k, new_v = _write_token(kv, k, vt, start)
    else:
        valid = positions == start[:, None] + jnp.arange(t)
        last = start + jnp.sum(valid, axis=1) - 1
        if _batched(kv[1]) or t > slots:
            slot_rows = jnp.where((j >= start[:, None]) & (j <= last[:, None]), j - start[:, None], -1)
            new_k, new_v = _write_chunk(kv, k, vt, slot_rows)
        else:
            new_k, new_v = _write_chunk_in_spans(kv, k, vt, start, last, ring=False)
    held = jnp.where(j <= last[:, None], j, -1)
    return new_k, new_v, held, held >= 0, (new_k, new_v)


def _ring_keys(kv, k, vt, positions):
    """A local layer's ring of `slots` (at most its window): position p in slot p % slots. One token (decode) is
    written first and attends over the ring. A longer chunk attends over the ring as it was plus itself, then
    writes its last rows: a ring only as long as the window stays exact for any chunk length."""
    cache_k, cache_v = kv
    t, slots = positions.shape[1], cache_v.shape[SLOT_AXIS["v"]]
    start = positions[:, 0]
    if t == 1:
        new_k, new_v = _write_token(kv, k, vt, jnp.mod(start, slots))
        held = ring_positions(start, slots)
        return new_k, new_v, held, held >= 0, (new_k, new_v)
    valid = positions == start[:, None] + jnp.arange(t)
    held = ring_positions(start - 1, slots)
    keys = jnp.concatenate([cache_k, _like_cache(k, cache_k).astype(cache_k.dtype)], axis=SLOT_AXIS["k"])
    values = jnp.concatenate([cache_v, _like_cache(vt, cache_v).astype(cache_v.dtype)], axis=SLOT_AXIS["v"])
    key_pos = jnp.concatenate([held, positions], axis=1)
    key_ok = jnp.concatenate([held >= 0, valid], axis=1)
    # Slot j now holds the chunk's latest row at a position congruent to j, if the chunk reached one.
    last = start + jnp.sum(valid, axis=1) - 1
    if _batched(cache_v) or t >= slots:  # a chunk as long as the ring rewrites all of it anyway
        wanted = ring_positions(last, slots)
        slot_rows = jnp.where(wanted >= start[:, None], wanted - start[:, None], -1)
        return keys, values, key_pos, key_ok, _write_chunk(kv, k, vt, slot_rows)
    return keys, values, key_pos, key_ok, _write_chunk_in_spans(kv, k, vt, start, last, ring=True)
