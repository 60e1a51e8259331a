"""Importance scores against an independent float64 numpy forward pass of the tiny decoder, written here."""

import numpy as np
import pytest

from nano.checkpoint import flat_params, model_from_flat
from nano.config import GLOBAL, TINY
from nano.errors import NanoError
from nano.model import init_model
from prune.importance import layer_importance, width_importance

C = TINY
# 5 rows (batches of 2 leave a short last batch) of 20 tokens: past the local layers' window of 8.
TOKENS = np.random.default_rng(0).integers(3, C.vocab_size, (5, 20)).astype(np.int32)
TOKENS[:, 0] = 2  # BOS


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + C.norm_eps) * scale


def _rope(x, base):  # x [B, T, heads, hd], split-half (NEOX) layout, positions 0..T-1
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[1])[:, None] * base ** (-np.arange(half) / half)
    sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _block(p, kind, x):
    """(output, (FFN activation [B, T, F], attention output per head [B, T, H, hd], attn_norm(x), mlp_norm(x)))."""
    b, t, _ = x.shape
    h, kvh, hd = C.num_heads, C.num_kv_heads, C.head_dim
    a_in = _rms(x, p["attn_norm.scale"])
    q = _rms((a_in @ p["attn.q_proj.kernel"]).reshape(b, t, h, hd), p["attn.q_norm.scale"])
    k = _rms((a_in @ p["attn.k_proj.kernel"]).reshape(b, t, kvh, hd), p["attn.k_norm.scale"])
    v = (a_in @ p["attn.v_proj.kernel"]).reshape(b, t, kvh, hd)
    base = C.rope_base_global if kind == GLOBAL else C.rope_base_local
    q, k = _rope(q, base) * C.head_dim ** -0.5, _rope(k, base)
    group = np.arange(h) // (h // kvh)  # query head → its KV head
    scores = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, group])
    qi, ki = np.arange(t)[:, None], np.arange(t)[None]
    mask = (ki <= qi) & ((kind == GLOBAL) | (qi - ki < C.sliding_window))
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    heads = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v[:, :, group])
    x = x + _rms(heads.reshape(b, t, h * hd) @ p["attn.o_proj.kernel"], p["post_attn_norm.scale"])
    m_in = _rms(x, p["mlp_norm.scale"])
    g = m_in @ p["mlp.gate.kernel"]
    act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * (m_in @ p["mlp.up.kernel"])
    return x + _rms(act @ p["mlp.down.kernel"], p["post_mlp_norm.scale"]), (act, heads, a_in, m_in)


def _reference(params, tokens, skip=None):
    """(per-layer taps, per-layer (input, output), mean NLL of tokens[:, 1:]) with layer `skip` the identity."""
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    emb = p["embedder.embedding"]
    x, taps, ios = emb[tokens] * np.sqrt(C.d_model), [], []
    for i, kind in enumerate(C.layer_types):
        if i == skip:
            continue
        out, tap = _block({k[len(f"layers.{i}."):]: v for k, v in p.items() if k.startswith(f"layers.{i}.")}, kind, x)
        taps.append(tap)
        ios.append((x, out))
        x = out
    logits = (_rms(x, p["final_norm.scale"]) @ emb.T)[:, :-1]
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return taps, ios, nll.mean()


def _batch_l2_of_sequence_mean(a):  # a [N, T, k] → [k]
    return np.sqrt(np.sum(np.mean(np.abs(a), axis=1) ** 2, axis=0))


@pytest.fixture(scope="module")
def model():
    return init_model(C, seed=3)


@pytest.mark.slow
def test_width_importance_matches_the_reference(model):
    scores = width_importance(model, TOKENS, batch_size=2)
    taps, _, _ = _reference(flat_params(model), TOKENS)
    ffn = np.stack([_batch_l2_of_sequence_mean(act) for act, _, _, _ in taps])
    heads = np.stack([_batch_l2_of_sequence_mean(np.linalg.norm(h, axis=-1)) for _, h, _, _ in taps])
    channels = sum(_batch_l2_of_sequence_mean(a) + _batch_l2_of_sequence_mean(m) for _, _, a, m in taps)
    assert scores["ffn"].shape == (C.num_layers, C.ffn_dim) and scores["heads"].shape == (C.num_layers, C.num_heads)
    np.testing.assert_allclose(scores["ffn"], ffn, rtol=1e-4)
    np.testing.assert_allclose(scores["heads"], heads, rtol=1e-4)
    np.testing.assert_allclose(scores["channels"], channels, rtol=1e-4)
    assert scores["rows"] == 5 and scores["tokens"] == TOKENS.size
    # Batching must not change the aggregate (the L2 runs over all rows, not per batch).
    np.testing.assert_allclose(width_importance(model, TOKENS, batch_size=5)["ffn"], scores["ffn"], rtol=1e-5)


def test_layer_importance_matches_the_reference(model):
    params = flat_params(model)
    scores = layer_importance(model, TOKENS, batch_size=2)
    _, ios, full = _reference(params, TOKENS)

    def cos(x, y):
        x, y = x[:, :-1], y[:, :-1]
        return np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)

    influence = [1 - cos(x, y).mean() for x, y in ios]
    drops = [_reference(params, TOKENS, skip=i)[2] - full for i in range(C.num_layers)]
    np.testing.assert_allclose(scores["block_influence"], influence, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores["nll"], full, rtol=1e-5)
    np.testing.assert_allclose(scores["drop_nll"], drops, rtol=1e-3, atol=2e-5)
    assert np.abs(drops).min() > 1e-3  # the tolerance above is far below every effect it checks
    assert scores["tokens"] == 5 * 19


def test_a_layer_that_does_nothing_scores_nothing(model):
    """Zero o_proj and down: both post-norms then output exactly 0, so the block is the identity."""
    params = {name: np.asarray(v) for name, v in flat_params(model).items()}
    for name in ("layers.1.attn.o_proj.kernel", "layers.1.mlp.down.kernel"):
        params[name] = np.zeros_like(params[name])
    scores = layer_importance(model_from_flat(C, params), TOKENS[:2], batch_size=2)
    assert abs(scores["drop_nll"][1]) < 1e-6 and abs(scores["block_influence"][1]) < 1e-6
    others = np.delete(scores["drop_nll"], 1)
    assert np.abs(others).min() > 1e-3 and np.delete(scores["block_influence"], 1).min() > 1e-2


@pytest.mark.parametrize("tokens, batch_size, message", [
    (TOKENS[0], 2, r"must be \[N, T\]"),
    (TOKENS[:, :1], 2, r"T >= 2"),
    (TOKENS.astype(np.float32), 2, "integer ids"),
    (TOKENS + C.vocab_size, 2, r"must lie in \[0, 512\)"),
    (TOKENS, 0, "batch_size must be positive"),
])
def test_bad_calibration_tokens_are_refused(model, tokens, batch_size, message):
    for measure in (width_importance, layer_importance):
        with pytest.raises(NanoError, match=message) as e:
            measure(model, tokens, batch_size=batch_size)
        assert "\n" not in str(e.value)
