"""Structured pruning: exact copies of the kept slices, exact function when nothing is cut, the embedding scale
compensated when d_model shrinks, layer kinds kept through depth pruning, a pruned config that decodes."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nano.checkpoint import flat_params, model_from_flat
from nano.config import GLOBAL, LOCAL, TINY, ModelConfig
from nano.errors import NanoError
from nano.kv_cache import KVCache
from nano.model import init_model
from prune.structure import choose, choose_heads, prune_params

run = nnx.jit(lambda model, tokens, positions=None, **kw: model(tokens, positions, **kw))
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 20)).astype(np.int32)  # past the window of 8
RNG = np.random.default_rng(7)
FFN = [sorted(RNG.choice(TINY.ffn_dim, 96, replace=False).tolist()) for _ in range(TINY.num_layers)]
HEADS = [[0, 3], [1, 2], [0, 2], [1, 3]]  # one query head from each KV group ({0, 1} and {2, 3}) per layer
CHANNELS = sorted(RNG.choice(TINY.d_model, 48, replace=False).tolist())
VOCAB = sorted(RNG.choice(TINY.vocab_size, 300, replace=False).tolist())


@pytest.fixture(scope="module")
def teacher():
    model = init_model(TINY, seed=5)
    return model, {name: np.asarray(v) for name, v in flat_params(model).items()}


def test_keeping_everything_reproduces_the_teacher(teacher):
    model, params = teacher
    every = dict(layers=range(4), ffn=[range(128)] * 4, heads=[range(4)] * 4, channels=range(64), vocab=range(512))
    config, new = prune_params(TINY, params, **every)
    assert config == TINY and config.hash == TINY.hash
    assert all(np.array_equal(new[name], params[name]) for name in params)
    logits, _ = run(model_from_flat(config, new), TOKENS)
    np.testing.assert_allclose(logits, run(model, TOKENS)[0], atol=1e-5, rtol=0)


def test_kept_weights_are_the_teachers_slices(teacher):
    _, p = teacher
    layers = [0, 2, 3]
    config, new = prune_params(TINY, p, layers=layers, ffn=FFN, heads=HEADS, channels=CHANNELS, vocab=VOCAB)
    assert (config.num_layers, config.ffn_dim, config.num_heads, config.num_kv_heads, config.d_model,
            config.vocab_size) == (3, 96, 2, 2, 48, 300)
    assert config.param_count == sum(v.size for v in new.values())
    ch, c = np.array(CHANNELS), math.sqrt(64 / 48)
    cols = np.concatenate([np.arange(16) + 16 * h for h in HEADS[3]])  # head_dim 16
    np.testing.assert_array_equal(new["layers.1.mlp.down.kernel"], p["layers.2.mlp.down.kernel"][FFN[2]][:, ch])
    np.testing.assert_array_equal(new["layers.1.mlp.gate.kernel"], p["layers.2.mlp.gate.kernel"][ch][:, FFN[2]])
    np.testing.assert_array_equal(new["layers.2.attn.q_proj.kernel"], p["layers.3.attn.q_proj.kernel"][ch][:, cols])
    np.testing.assert_array_equal(new["layers.2.attn.o_proj.kernel"], p["layers.3.attn.o_proj.kernel"][cols][:, ch])
    np.testing.assert_array_equal(new["layers.2.attn.k_proj.kernel"], p["layers.3.attn.k_proj.kernel"][ch])
    np.testing.assert_array_equal(new["layers.0.attn.q_norm.scale"], p["layers.0.attn.q_norm.scale"])
    np.testing.assert_array_equal(new["layers.1.post_mlp_norm.scale"], p["layers.2.post_mlp_norm.scale"][ch])
    np.testing.assert_allclose(new["embedder.embedding"], p["embedder.embedding"][VOCAB][:, ch] * c, rtol=1e-6)
    np.testing.assert_allclose(new["final_norm.scale"], p["final_norm.scale"][ch] / c, rtol=1e-6)


def test_channel_pruning_compensates_the_embedding_scale(teacher):
    model, p = teacher
    config, new = prune_params(TINY, p, channels=CHANNELS)
    pruned, ch = model_from_flat(config, new), np.array(CHANNELS)
    # The lookup of the kept channels is the teacher's (sqrt(d_new) times c = sqrt(d_old)).
    np.testing.assert_allclose(pruned.embedder.encode(TOKENS, jnp.float32),
                               np.asarray(model.embedder.encode(TOKENS, jnp.float32))[..., ch], rtol=1e-6)
    # The head: the teacher's kept-channel terms, normalised by the RMS of the kept channels.
    x = np.random.default_rng(2).normal(size=(1, 5, 64)).astype(np.float32)[..., ch]
    expected = (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + TINY.norm_eps) * p["final_norm.scale"][ch]
                @ p["embedder.embedding"][:, ch].T)
    np.testing.assert_allclose(pruned.head(pruned.final_norm(jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_depth_pruning_keeps_each_layers_kind(teacher):
    model, p = teacher
    assert TINY.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL)
    config, new = prune_params(TINY, p, layers=[0, 1, 3])
    assert config.layer_types == (LOCAL, GLOBAL, GLOBAL)
    assert ModelConfig.from_dict(config.to_dict()) == config
    # The pruned model is the teacher with layer 2 skipped.
    positions = jnp.broadcast_to(jnp.arange(20), TOKENS.shape)
    x = model.embedder.encode(TOKENS, jnp.float32)
    for i in (0, 1, 3):
        x, _ = model.layers[i](x, positions)
    expected = model.head(model.final_norm(x))
    np.testing.assert_allclose(run(model_from_flat(config, new), TOKENS)[0], expected, atol=1e-5, rtol=0)
    # The kinds matter: the same weights in the plain pattern (local, global, local) compute something else.
    pattern = dataclasses.replace(config, layer_kinds=None)
    assert np.abs(np.asarray(run(model_from_flat(pattern, new), TOKENS)[0] - expected)).max() > 1e-3


def test_a_pruned_model_decodes_like_its_full_forward(teacher):
    _, p = teacher
    config, new = prune_params(TINY, p, layers=[1, 2, 3], ffn=FFN, heads=HEADS, channels=CHANNELS, vocab=VOCAB)
    model = model_from_flat(config, new)
    tokens = TOKENS[:1] % config.vocab_size
    cache, steps = KVCache.zeros(config, 1, 20), []
    for i in range(tokens.shape[1]):
        logits, cache = run(model, tokens[:, i:i + 1], jnp.full((1, 1), i), cache=cache)
        steps.append(logits)
    full, _ = run(model, tokens)
    assert np.abs(np.asarray(jnp.concatenate(steps, 1) - full)).max() <= 1e-5


def test_choose_keeps_the_top_scores():
    assert choose([0.1, 0.5, 0.5, 0.2], 2) == [1, 2]
    assert choose([1.0, 1.0, 1.0], 2) == [0, 1]  # ties: the lower index
    assert choose_heads([0.9, 0.1, 0.2, 0.8], 2, 2) == [0, 3]
    assert choose_heads([5, 4, 1, 0], 2, 2) == [0, 2]  # the best of each group, not the best two overall
    assert choose_heads([5, 4, 1, 0, 3, 9], 4, 2) == [0, 1, 4, 5]


BAD = [
    (dict(layers=range(5)), "keeps 5 but the teacher has only 4"),
    (dict(layers=[]), "layers keeps nothing"),
    (dict(layers=[1, 0]), "must be sorted, unique"),
    (dict(layers=[0, 0, 1]), "must be sorted, unique"),
    (dict(layers=[0, 4]), r"indices in \[0, 4\)"),
    (dict(ffn=[[0, 1.5]] * 4), "integer indices"),
    (dict(ffn=[[0, 1]] * 3), "one list per kept layer"),
    (dict(layers=[0, 1], ffn=[[0, 1]] * 3), r"one list per kept layer \(2\) or per teacher layer \(4\)"),
    (dict(ffn=[[0, 1]] * 3 + [[0, 1, 2]]), "same count in every layer"),
    (dict(heads=[[0, 1]] * 4), "every group must keep the same number"),
    (dict(heads=[[2]] * 4), "every group must keep the same number"),
    (dict(heads=[[0, 2, 4]] * 4), r"indices in \[0, 4\)"),
    (dict(channels=range(63)), "even d_model"),
    (dict(vocab=range(513)), "only 512"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_pruning_requests_are_refused(teacher, kwargs, message):
    with pytest.raises(NanoError, match=message) as e:
        prune_params(TINY, teacher[1], **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call, message", [
    (lambda p: prune_params(TINY, {k: v for k, v in p.items() if k != "final_norm.scale"}), "missing"),
    (lambda p: prune_params(TINY, {**p, "final_norm.scale": np.zeros(64, np.int32)}), "float parameters"),
    (lambda p: choose([1.0, 2.0], 3), "cannot keep 3 of 2"),
    (lambda p: choose([1.0, float("nan")], 1), "finite"),
    (lambda p: choose_heads([1, 2, 3, 4], 3, 2), "multiple of 2"),
    (lambda p: choose_heads([1, 2, 3], 2, 2), "do not divide"),
])
def test_bad_choices_are_refused(teacher, call, message):
    with pytest.raises(NanoError, match=message) as e:
        call(teacher[1])
    assert "\n" not in str(e.value)
