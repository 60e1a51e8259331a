"""Perplexity with one protocol for every stage (the CLI, distillation's eval, quantization and bench reports).

The text is tokenized without BOS and cut into consecutive non-overlapping chunks of (window - 1) tokens; each
chunk gets BOS in front and every text token is scored given the tokens before it in its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.errors import NanoError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    tokens: int
    nll_sum: float

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens}


def make_windows(ids: list[int] | np.ndarray, *, window: int, bos_id: int, pad_id: int = 0):
    """(tokens [N, window], weights [N, window]) where weights[n, t] = 1 if tokens[n, t + 1] is scored.

    The last chunk may be shorter than the others; it is padded and its padding is not scored.
    """
    if window < 2:
        raise NanoError(f"window must be at least 2, got {window}")
    ids = np.asarray(ids, np.int32)
    if ids.size == 0:
        raise NanoError("the text is empty: nothing to score")
    chunk = window - 1
    n = -(-ids.size // chunk)
    tokens = np.full((n, window), pad_id, np.int32)
    weights = np.zeros((n, window), np.float32)
    tokens[:, 0] = bos_id
    for i in range(n):
        part = ids[i * chunk:(i + 1) * chunk]
        tokens[i, 1:1 + part.size] = part
        weights[i, :part.size] = 1.0
    return tokens, weights


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """-log p(tokens[:, t+1] | ...) at every position t, [B, T] (the last position gets 0)."""
    logits = logits.astype(jnp.float32)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return nll.at[:, -1].set(0.0)


def perplexity(model, tokenizer, text: str, *, window: int = 512, batch_size: int = 4,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `model` on `text` (see the module docstring for the protocol)."""
    if not text:
        raise NanoError("the text is empty: nothing to score")
    tokens, weights = make_windows(tokenizer.encode(text), window=window, bos_id=tokenizer.bos_id,
                                   pad_id=tokenizer.pad_id)
    graphdef, state = nnx.split(model)

    @jax.jit
    def window_nll(state, tokens, weights):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        return jnp.sum(token_nll(logits, tokens) * weights)

    total, n = 0.0, len(tokens)
    for start in range(0, n, batch_size):
        batch_tokens, batch_weights = tokens[start:start + batch_size], weights[start:start + batch_size]
        if len(batch_tokens) < batch_size:  # pad the batch so every call has one compiled shape
            fill = batch_size - len(batch_tokens)
            batch_tokens = np.concatenate([batch_tokens, np.repeat(batch_tokens[-1:], fill, 0)])
            batch_weights = np.concatenate([batch_weights, np.zeros((fill, window), np.float32)])
        total += float(window_nll(state, batch_tokens, batch_weights))
        if progress:
            progress(min(start + batch_size, n), n)
    count = int(weights.sum())
    return Perplexity(ppl=math.exp(total / count), tokens=count, nll_sum=total)
