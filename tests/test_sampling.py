"""Sampling: each rule checked on known distributions; cached generation equals cache-free greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nano.errors import NanoError
from nano.sampling import Generator, SamplingConfig, sample_logits

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def _draws(cfg, n=2000, logits=LOGITS):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample_logits(logits, k, cfg)[0])(keys))


def test_temperature_zero_is_argmax():
    assert set(_draws(SamplingConfig(temperature=0), n=10)) == {0}


def test_plain_sampling_follows_the_distribution():
    counts = np.bincount(_draws(SamplingConfig(temperature=1.0)), minlength=5) / 2000
    assert np.allclose(counts, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.04)


def test_top_k_keeps_k_most_likely():
    draws = _draws(SamplingConfig(temperature=1.0, top_k=2))
    assert set(draws) == {0, 1}
    assert np.mean(draws == 0) == pytest.approx(0.5 / 0.75, abs=0.04)  # renormalised over the two


def test_top_p_keeps_smallest_prefix_reaching_p():
    assert set(_draws(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert set(_draws(SamplingConfig(temperature=1.0, top_p=0.75))) == {0, 1}
    assert set(_draws(SamplingConfig(temperature=1.0, top_p=0.76))) == {0, 1, 2}
    assert set(_draws(SamplingConfig(temperature=1.0, top_p=0.1))) == {0}  # never empty


def test_low_temperature_sharpens():
    assert np.mean(_draws(SamplingConfig(temperature=0.25)) == 0) > 0.9


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(NanoError):
        SamplingConfig(**kwargs)


def _greedy_without_cache(model, prompt, steps, length=32):
    """Re-run the whole sequence every step; right padding to one length keeps one compile (causal mask)."""
    forward = nnx.jit(lambda m, tokens: m(tokens)[0])
    ids = list(prompt)
    for _ in range(steps):
        logits = forward(model, jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32))
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids[len(prompt):]


def test_cached_greedy_equals_full_recompute_past_the_window(tiny_model):
    prompt = [2, 17, 33, 101, 7]
    steps = 20  # 25 positions: past the tiny window of 8 on the local layers
    out = Generator(tiny_model, SamplingConfig(temperature=0)).generate(prompt, max_new_tokens=steps)
    assert out == _greedy_without_cache(tiny_model, prompt, steps)


def test_stop_tokens_end_generation(tiny_model):
    generator = Generator(tiny_model, SamplingConfig(temperature=0))
    full = generator.generate([2, 5, 9], max_new_tokens=10)
    stop = full[3]
    stopped = generator.generate([2, 5, 9], max_new_tokens=10, stop_ids=(stop,))
    assert stopped == full[:full.index(stop)]


def test_seeds_reproduce_and_differ(tiny_model):
    generator = Generator(tiny_model, SamplingConfig(temperature=1.0))
    a = generator.generate([2, 5], max_new_tokens=12, seed=1)
    assert a == generator.generate([2, 5], max_new_tokens=12, seed=1)
    assert a != generator.generate([2, 5], max_new_tokens=12, seed=2)


def test_context_overflow_is_refused(tiny_model):
    with pytest.raises(NanoError, match="exceeds the model's context"):
        Generator(tiny_model, SamplingConfig()).generate([2] * 200, max_new_tokens=100)
