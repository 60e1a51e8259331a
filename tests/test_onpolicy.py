"""On-policy batches: which steps, the rows' layout and masks, determinism, and that samples come from the student."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.onpolicy import OnPolicy
from nano.config import TINY
from nano.model import init_model

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

ACCUM, ROWS, S = 2, 3, 20  # S > TINY's window of 8: decoding must get the sliding window right


@pytest.fixture(scope="module")
def student():
    model = init_model(TINY, seed=3)
    return model, nnx.graphdef(model), nnx.state(model, nnx.Param)


def make_batch(seed=0):
    """A packed-looking batch: two documents per row, second one starting at 7 (boundaries inside the prompt)."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(4, TINY.vocab_size, size=(ACCUM, ROWS, S + 1)).astype(np.int32)
    seg = np.where(np.arange(S) < 7, 1, 2).astype(np.int32)
    pos = np.where(np.arange(S) < 7, np.arange(S), np.arange(S) - 7).astype(np.int32)
    weights = np.ones(S, np.float32)
    weights[6] = 0.0
    shape = (ACCUM, ROWS, S)
    return {"tokens": stream[..., :-1], "targets": stream[..., 1:],
            "positions": np.broadcast_to(pos, shape).copy(), "segment_ids": np.broadcast_to(seg, shape).copy(),
            "weights": np.broadcast_to(weights, shape).copy()}


def test_fraction_zero_never_and_one_always(student):
    _, graphdef, params = student
    batch = make_batch()
    never = OnPolicy(graphdef, TINY, fraction=0.0)
    always = OnPolicy(graphdef, TINY, fraction=1.0)
    assert not any(never.is_on_policy(s) for s in range(500))
    assert all(always.is_on_policy(s) for s in range(500))
    assert never(batch, 5, params) is batch
    out = always(batch, 5, params)
    assert "ce_weights" in out and not np.array_equal(out["tokens"], batch["tokens"])


def test_fraction_is_a_deterministic_choice_of_seed_and_step(student):
    _, graphdef, _ = student
    def chosen(seed):
        policy = OnPolicy(graphdef, TINY, fraction=0.3, seed=seed)
        return np.array([policy.is_on_policy(s) for s in range(1000)])

    a, again, other = chosen(0), chosen(0), chosen(1)
    assert 250 <= a.sum() <= 350
    np.testing.assert_array_equal(a, again)
    assert (a != other).sum() > 100  # another seed picks other steps (independent choices differ on ~42%)
    # Not a fixed period: the gaps between on-policy steps vary.
    assert len(set(np.diff(np.flatnonzero(a)).tolist())) > 3


def test_on_policy_rows_layout_and_masks(student):
    _, graphdef, params = student
    batch = make_batch()
    policy = OnPolicy(graphdef, TINY, fraction=1.0, prompt_fraction=0.4, eos_id=-1)  # no EOS: nothing cut
    p = policy.prompt_length(S)
    assert p == 8
    out = policy(batch, 0, params)
    for key, value in batch.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
    assert out["ce_weights"].shape == batch["weights"].shape and out["ce_weights"].dtype == np.float32
    np.testing.assert_array_equal(out["ce_weights"], 0.0)
    np.testing.assert_array_equal(out["tokens"][..., :p], batch["tokens"][..., :p])
    np.testing.assert_array_equal(out["targets"][..., :-1], out["tokens"][..., 1:])
    np.testing.assert_array_equal(out["positions"], np.broadcast_to(np.arange(S), (ACCUM, ROWS, S)))
    np.testing.assert_array_equal(out["segment_ids"], 1)
    expected = np.broadcast_to((np.arange(S) >= p - 1).astype(np.float32), (ACCUM, ROWS, S))
    np.testing.assert_array_equal(out["weights"], expected)
    # The generated parts are genuinely new (not a copy of the input's continuation).
    assert (out["tokens"][..., p:] != batch["tokens"][..., p:]).mean() > 0.9


def test_same_step_repeats_and_another_step_differs(student):
    _, graphdef, params = student
    batch = make_batch()
    policy = OnPolicy(graphdef, TINY, fraction=1.0, seed=7)
    a = policy(batch, 11, params)
    b = OnPolicy(graphdef, TINY, fraction=1.0, seed=7)(batch, 11, params)  # a fresh object: as after a resume
    c = policy(batch, 12, params)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    p = policy.prompt_length(S)
    assert (a["targets"][..., p - 1:] != c["targets"][..., p - 1:]).mean() > 0.5
    # Params are an argument, not a constant of the program: new params sample differently, with no recompile.
    other = jax.tree.map(lambda x: x * 1.5, params)
    d = policy(batch, 11, other)
    assert (a["targets"][..., p - 1:] != d["targets"][..., p - 1:]).mean() > 0.5
    assert policy._generate._cache_size() == 1


def test_low_temperature_continuation_is_the_students_greedy_decoding(student):
    _, graphdef, params = student
    batch = make_batch(seed=4)
    policy = OnPolicy(graphdef, TINY, fraction=1.0, temperature=1e-4, eos_id=-1)
    p = policy.prompt_length(S)
    out = policy(batch, 3, params)
    # Full recompute without a cache, on a fixed-length buffer (one compile): attention is causal, so the
    # not-yet-filled tail cannot change the logits at the last real token.
    full = jax.jit(lambda state, seq: nnx.merge(graphdef, state)(seq)[0])
    for a, r in [(0, 0), (1, 2)]:
        seq = np.zeros((1, S + 1), np.int32)
        seq[0, :p] = batch["tokens"][a, r, :p]
        for n in range(p, S + 1):
            seq[0, n] = int(jnp.argmax(full(params, jnp.asarray(seq))[0, n - 1]))
        seq = seq[0]
        np.testing.assert_array_equal(out["tokens"][a, r], seq[:S])
        np.testing.assert_array_equal(out["targets"][a, r], seq[1:])


def test_weights_stop_after_the_first_generated_eos(student):
    _, graphdef, params = student
    batch = make_batch(seed=5)
    step = 2
    free = OnPolicy(graphdef, TINY, fraction=1.0, eos_id=-1)(batch, step, params)
    p = OnPolicy(graphdef, TINY, fraction=1.0).prompt_length(S)
    # Force an EOS: declare as EOS the token the student sampled at target p + 2 of row (0, 0), which the
    # sampling does not depend on (same seed and step → same samples); pick one it did not generate earlier.
    generated = free["targets"][0, 0, p - 1:]
    j = next(i for i in range(3, len(generated)) if generated[i] not in generated[:i])
    eos = int(generated[j])
    out = OnPolicy(graphdef, TINY, fraction=1.0, eos_id=eos)(batch, step, params)
    np.testing.assert_array_equal(out["targets"], free["targets"])
    cut = p - 1 + j  # target index of the first generated EOS: kept, everything after it masked
    expected_row = ((np.arange(S) >= p - 1) & (np.arange(S) <= cut)).astype(np.float32)
    np.testing.assert_array_equal(out["weights"][0, 0], expected_row)
    assert out["weights"][0, 0].sum() == j + 1
    # Every row follows the same rule, from its own first generated EOS.
    for a in range(ACCUM):
        for r in range(ROWS):
            targets = out["targets"][a, r]
            hits = [t for t in range(p - 1, S) if targets[t] == eos]
            last = hits[0] if hits else S - 1
            want = ((np.arange(S) >= p - 1) & (np.arange(S) <= last)).astype(np.float32)
            np.testing.assert_array_equal(out["weights"][a, r], want)
    # An EOS inside the prompt is not generated by the student and does not cut anything.
    prompt_eos = int(batch["tokens"][0, 0, 2])
    out = OnPolicy(graphdef, TINY, fraction=1.0, eos_id=prompt_eos)(batch, step, params)
    if prompt_eos not in out["targets"][0, 0, p - 1:]:
        np.testing.assert_array_equal(out["weights"][0, 0], (np.arange(S) >= p - 1).astype(np.float32))
