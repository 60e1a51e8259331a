"""The one decoder: cache parity across the sliding window, packed documents, dtypes, rope, masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nano.config import TINY
from nano.layers import apply_rope
from nano.kv_cache import KVCache
from nano.model import attention_mask, init_model

# Jitted calls: one compile per shape is much faster than op-by-op dispatch of a whole decoder.
run = nnx.jit(lambda model, tokens, positions=None, **kw: model(tokens, positions, **kw))


def _tokens(batch, length, seed=1, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def _positions(batch, start, stop):
    return jnp.broadcast_to(jnp.arange(start, stop), (batch, stop - start))


def _incremental(model, tokens, prefill, cache_len, *, cache_dtype=jnp.float32, caches=None):
    """Logits from a prefill of `prefill` tokens, then one token at a time through the cache (a `cache_dtype`
    cache; each cache the model returns is appended to `caches` when given)."""
    b, t = tokens.shape
    cache = KVCache.zeros(model.config, b, cache_len, dtype=cache_dtype)
    logits, cache = run(model, tokens[:, :prefill], _positions(b, 0, prefill), cache=cache)
    out = [logits]
    for i in range(prefill, t):
        logits, cache = run(model, tokens[:, i:i + 1], _positions(b, i, i + 1), cache=cache)
        out.append(logits)
        if caches is not None:
            caches.append(cache)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("prefill", [1, 5, 13])
def test_cache_parity_past_the_sliding_window(tiny_model, prefill):
    tokens = _tokens(2, 3 * TINY.sliding_window)  # 24 tokens: three windows of the local layers
    full, _ = run(tiny_model, tokens)
    incremental = _incremental(tiny_model, tokens, prefill, cache_len=32)
    assert np.abs(np.asarray(full - incremental)).max() <= 1e-5


@pytest.mark.slow
def test_chunked_prefill_equals_full_sequence(tiny_model):
    tokens = _tokens(1, 20, seed=3)
    cache = KVCache.zeros(TINY, 1, 20)
    first, cache = run(tiny_model, tokens[:, :12], _positions(1, 0, 12), cache=cache)
    second, _ = run(tiny_model, tokens[:, 12:], _positions(1, 12, 20), cache=cache)
    full, _ = run(tiny_model, tokens)
    assert np.abs(np.asarray(jnp.concatenate([first, second], 1) - full)).max() <= 1e-5


def test_sliding_window_limits_what_local_layers_see():
    """With only local layers, a token further back than the window cannot change the last logits."""
    local_only = init_model(dataclasses.replace(TINY, global_every=100), seed=2)
    tokens = _tokens(1, 20, seed=4)
    changed_far = tokens.at[0, 0].set((tokens[0, 0] + 1) % TINY.vocab_size)
    changed_near = tokens.at[0, 15].set((tokens[0, 15] + 1) % TINY.vocab_size)
    base = run(local_only, tokens)[0][0, -1]
    # Stacked local layers pass information further back (window - 1 per layer), so one layer isolates the window.
    one_layer = init_model(dataclasses.replace(TINY, num_layers=1, global_every=100), seed=2)
    base1 = run(one_layer, tokens)[0][0, -1]
    assert np.allclose(run(one_layer, changed_far)[0][0, -1], base1, atol=1e-6)
    assert not np.allclose(run(one_layer, changed_near)[0][0, -1], base1, atol=1e-3)
    assert not np.allclose(run(local_only, changed_near)[0][0, -1], base, atol=1e-3)


@pytest.mark.slow
def test_packed_documents_do_not_see_each_other(tiny_model):
    a, b = _tokens(1, 10, seed=5), _tokens(1, 14, seed=6)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(14)])[None]
    segments = jnp.concatenate([jnp.full(10, 1), jnp.full(14, 2)])[None]
    logits, _ = run(tiny_model, packed, positions, segment_ids=segments)
    alone_a, _ = run(tiny_model, a)
    alone_b, _ = run(tiny_model, b)
    assert np.abs(np.asarray(logits[:, :10] - alone_a)).max() <= 1e-5
    assert np.abs(np.asarray(logits[:, 10:] - alone_b)).max() <= 1e-5


def test_bfloat16_compute_tracks_float32(tiny_model):
    tokens = _tokens(2, 16, seed=7)
    f32, _ = run(tiny_model, tokens)
    bf16_model = init_model(TINY, seed=0, dtype=jnp.bfloat16)
    bf16, _ = run(bf16_model, tokens)
    assert bf16.dtype == jnp.float32  # logits always float32
    p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
    assert float(jnp.abs(p32 - p16).max()) < 0.05
    assert float(jnp.mean(jnp.argmax(f32, -1) == jnp.argmax(bf16, -1))) > 0.9


@pytest.mark.slow
def test_bfloat16_cache_parity():
    """A bfloat16 model decoding through a bfloat16 cache matches its full-sequence pass, and the cache it reads
    and writes at every step stays bfloat16 (the path really ran in bfloat16)."""
    model = init_model(TINY, seed=0, dtype=jnp.bfloat16)
    tokens = _tokens(1, 12, seed=8)
    full, _ = run(model, tokens)
    caches = []
    incremental = _incremental(model, tokens, 4, 16, cache_dtype=jnp.bfloat16, caches=caches)
    assert float(jnp.abs(full - incremental).max()) < 0.1
    assert len(caches) == 8 and {x.dtype for c in caches for x in (*c.k, *c.v)} == {jnp.dtype(jnp.bfloat16)}


def test_final_logit_softcap_bounds_logits():
    capped = init_model(dataclasses.replace(TINY, final_logit_softcap=2.0), seed=0)
    logits, _ = run(capped, _tokens(1, 8))
    assert float(jnp.abs(logits).max()) < 2.0
    assert float(jnp.abs(logits).max()) > 1.0  # the cap bends real values, not zeros


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(qp, kp):
        rq = apply_rope(q, jnp.array([[qp]]), base=10_000.0)
        rk = apply_rope(k, jnp.array([[kp]]), base=10_000.0)
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    # Linear scaling by s maps position p to p / s.
    scaled = apply_rope(q, jnp.array([[16]]), base=10_000.0, scale=8.0)
    assert np.allclose(scaled, apply_rope(q, jnp.array([[2]]), base=10_000.0), atol=1e-5)


def test_attention_mask_rules():
    pos = jnp.arange(6)[None]
    causal = attention_mask(pos, pos, window=None, causal_by_index=True)[0]
    assert np.array_equal(causal, np.tril(np.ones((6, 6), bool)))
    windowed = attention_mask(pos, pos, window=2, causal_by_index=True)[0]
    assert np.array_equal(windowed, np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -2))
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    packed = attention_mask(pos, pos, window=None, causal_by_index=True, q_seg=seg, k_seg=seg)[0]
    assert not packed[3, 2] and packed[4, 3] and packed[2, 0]


def test_cache_misuse_is_refused(tiny_model):
    tokens = _tokens(1, 4)
    with pytest.raises(ValueError, match="positions are required"):
        run(tiny_model, tokens, cache=KVCache.zeros(TINY, 1, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        run(tiny_model, tokens, _positions(1, 0, 4), segment_ids=jnp.ones((1, 4), jnp.int32),
                   cache=KVCache.zeros(TINY, 1, 8))


@pytest.mark.slow
def test_head_applied_to_hidden_states_equals_logits(tiny_model):
    tokens = _tokens(1, 10, seed=9)
    logits, _ = run(tiny_model, tokens)
    hidden, _ = tiny_model(tokens, return_hidden=True)
    assert hidden.shape == (1, 10, TINY.d_model)
    assert np.allclose(tiny_model.head(hidden), logits, atol=1e-5)
    rows = jnp.array([3, 77, 500])  # a vocabulary slice gives those columns
    part = tiny_model.head(hidden, tiny_model.embedder.embedding[...][rows])
    assert np.allclose(part, logits[..., rows], atol=1e-5)


# (real rows, padding rows) of each call, in TINY's rings of 8 slots: chunks inside the ring, chunks that wrap past
# its end (the second padded, reaching back over slots the first span also writes), a whole window, a decoded token,
# and a last chunk whose padding reaches past the context's end.
CHUNKS = [(3, 1), (4, 0), (3, 1), (8, 0), (1, 0), (2, 6), (5, 1), (3, 5)]


def test_one_sequence_writes_its_cache_as_a_batch_of_it_would(tiny_model):
    """One sequence's prefill chunks are written with a dynamic-update-slice of T slots (two in a ring that the chunk
    wraps), a batch's by selecting over the whole cache: the same caches and logits for every chunk above, in the
    window-sized rings as in the context-long caches, down to the context's last slot."""
    context = sum(real for real, _ in CHUNKS)
    tokens = _tokens(1, context, seed=5)
    one, two = KVCache.zeros(TINY, 1, context), KVCache.zeros(TINY, 2, context)
    start = 0
    for real, pad in CHUNKS:
        chunk = jnp.concatenate([tokens[:, start:start + real], jnp.zeros((1, pad), tokens.dtype)], axis=1)
        positions = jnp.concatenate([_positions(1, start, start + real), jnp.zeros((1, pad), jnp.int32)], axis=1)
        logits_one, one = run(tiny_model, chunk, positions, cache=one)
        logits_two, two = run(tiny_model, jnp.tile(chunk, (2, 1)), jnp.tile(positions, (2, 1)), cache=two)
        np.testing.assert_allclose(np.asarray(logits_one[0, :real]), np.asarray(logits_two[1, :real]), atol=1e-5)
        for a, b in zip((*one.k, *one.v), (*two.k, *two.v)):
            np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[1]), atol=1e-5)
        start += real
    assert start == context and one.k[0].shape[2] == TINY.sliding_window and one.k[1].shape[2] == context


@pytest.mark.slow
def test_padded_chunk_rows_are_neither_seen_nor_written(tiny_model):
    """LiteRT-LM pads a short last prefill chunk with position 0; those rows must change nothing: the cache equals
    the unpadded chunk's, in the window-sized rings as in the full-length ones."""
    tokens = _tokens(1, 13, seed=11)
    cache = KVCache.zeros(TINY, 1, 32)
    _, cache = run(tiny_model, tokens[:, :10], _positions(1, 0, 10), cache=cache)  # fills past the window
    real = tokens[:, 10:13]
    padded = jnp.concatenate([real, jnp.zeros((1, 5), real.dtype)], axis=1)
    pad_positions = jnp.concatenate([_positions(1, 10, 13), jnp.zeros((1, 5), jnp.int32)], axis=1)
    _, want = run(tiny_model, real, _positions(1, 10, 13), cache=cache)
    _, got = run(tiny_model, padded, pad_positions, cache=cache)
    for a, b in zip((*want.k, *want.v), (*got.k, *got.v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert got.k[0].shape[2] == TINY.sliding_window and got.k[1].shape[2] == 32  # local ring, global context
    assert got.v[0].shape[3] == TINY.sliding_window and got.v[1].shape[3] == 32  # values transposed


@pytest.mark.slow
def test_init_in_parts_equals_whole_model_init():
    """init_param_parts (the export's way to make a preset larger than memory) gives init_model's exact values,
    one part at a time: the embedding, each layer, the final norm."""
    from nano.checkpoint import flat_params
    from nano.model import init_param_parts

    whole = {k: np.asarray(v) for k, v in flat_params(init_model(TINY, seed=3)).items()}
    parts = list(init_param_parts(TINY, seed=3))
    assert len(parts) == TINY.num_layers + 2 and all(parts)
    merged = {k: np.asarray(v) for part in parts for k, v in part.items()}
    assert merged.keys() == whole.keys() and sum(map(len, parts)) == len(whole)
    for name, value in whole.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
