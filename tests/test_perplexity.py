"""The perplexity protocol: windows, BOS, what is scored; the result against a direct numpy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from nano.errors import NanoError
from nano.perplexity import make_windows, perplexity
from nano.scoring import next_token_nll as token_nll


def test_windows_follow_the_protocol():
    ids = list(range(10, 21))  # 11 tokens, window 5 → chunks of 4: 4 + 4 + 3
    tokens, weights = make_windows(ids, window=5, bos_id=2, pad_id=0)
    assert tokens.tolist() == [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17], [2, 18, 19, 20, 0]]
    assert weights.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert weights.sum() == len(ids)  # every text token scored exactly once


def test_empty_or_degenerate_input_is_refused():
    with pytest.raises(NanoError, match="empty"):
        make_windows([], window=8, bos_id=2)
    with pytest.raises(NanoError, match="at least 2"):
        make_windows([5, 6], window=1, bos_id=2)


def test_token_nll_is_negative_log_softmax_of_next_token():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 4, 7)).astype(np.float32)
    tokens = np.array([[2, 5, 1, 6]])
    nll = np.asarray(token_nll(jnp.asarray(logits), jnp.asarray(tokens)))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [-log_probs[0, t, tokens[0, t + 1]] for t in range(3)] + [0.0]
    assert np.allclose(nll[0], expected, atol=1e-5)


def _direct_perplexity(model, tokenizer, text, window):
    tokens, weights = make_windows(tokenizer.encode(text), window=window, bos_id=tokenizer.bos_id)
    total = 0.0
    for row, w in zip(tokens, weights):
        logits = np.asarray(model(jnp.asarray(row[None]))[0][0], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        total -= sum(log_probs[t, row[t + 1]] for t in range(window - 1) if w[t])
    return np.exp(total / weights.sum()), int(weights.sum())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_direct_computation(tiny_model, tiny_tokenizer, batch_size):
    text = "Kalo mine ruva, the sato quing. " * 12
    result = perplexity(tiny_model, tiny_tokenizer, text, window=16, batch_size=batch_size)
    expected, count = _direct_perplexity(tiny_model, tiny_tokenizer, text, 16)
    assert result.tokens == count == len(tiny_tokenizer.encode(text))
    assert result.ppl == pytest.approx(expected, rel=1e-4)
