"""Perplexity and bits per byte of a text, with one protocol for every stage (`nano perplexity`, quantization's
report, perplexity through an exported artifact, llama.cpp's side of the bench).

The text is tokenized without BOS and cut into consecutive non-overlapping chunks of (window - 1) tokens; each
chunk gets BOS in front and every text token is scored given the tokens before it in its window. Bits per byte
divide the same total NLL by ln 2 × the UTF-8 bytes of the text, which does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from nano.errors import NanoError
from nano.scoring import bits_per_byte


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    tokens: int
    nll_sum: float
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll_sum, self.bytes)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "bits_per_byte": self.bits_per_byte, "bytes": self.bytes}


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


def calibration_windows(tokenizer, text: str, *, samples: int, seq_len: int) -> np.ndarray:
    """[samples, seq_len] windows (BOS + text) spread evenly over `text`, so that they cover all of it: the
    calibration sequences of GPTQ / AWQ and of pruning's importance scores."""
    windows, _ = make_windows(tokenizer.encode(text), window=seq_len, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    full = windows[:-1] if len(windows) > 1 else windows  # the last window may be padding
    if len(full) < samples:
        raise NanoError(f"the calibration text gives {len(full)} sequences of {seq_len} tokens; {samples} were asked "
                        "for (pass a longer --calibration text or fewer --samples)")
    return full[np.linspace(0, len(full) - 1, samples).round().astype(int)]


def window_batches(tokenizer, text: str, *, window: int = 512, batch_size: int = 4) -> list[dict]:
    """The protocol's windows as evaluation batches (nano.evaluate.BATCH_KEYS): each scored token is a target with
    weight 1; the last batch is filled with unscored rows, so every batch has one compiled shape."""
    tokens, weights = make_windows(tokenizer.encode(text), window=window, bos_id=tokenizer.bos_id,
                                   pad_id=tokenizer.pad_id)
    fill = -len(tokens) % batch_size
    tokens = np.concatenate([tokens, np.full((fill, window), tokenizer.pad_id, np.int32)])
    weights = np.concatenate([weights, np.zeros((fill, window), np.float32)])
    targets = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    positions = np.broadcast_to(np.arange(window, dtype=np.int32), tokens.shape)
    return [{"tokens": tokens[i:i + batch_size], "targets": targets[i:i + batch_size],
             "positions": positions[i:i + batch_size], "segment_ids": np.ones((batch_size, window), np.int32),
             "weights": weights[i:i + batch_size]} for i in range(0, len(tokens), batch_size)]


def perplexity(model, tokenizer, text: str, *, window: int = 512, batch_size: int = 4,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity and bits per byte of `model` on `text` (see the module docstring for the protocol)."""
    from nano.evaluate import Evaluator

    if not text:
        raise NanoError("the text is empty: nothing to score")
    result = Evaluator(window_batches(tokenizer, text, window=window, batch_size=batch_size))(model, progress=progress)
    tokens = result["heldout_tokens"]
    return Perplexity(ppl=result["heldout_ppl"], tokens=tokens, nll_sum=result["heldout_nll"] * tokens,
                      bytes=len(text.encode("utf-8")))


def runtime_perplexity(ids, text: str, logits_of_window: Callable[[np.ndarray], Iterable[np.ndarray]], *,
                       window: int, bos_id: int) -> dict:
    """The protocol through another runtime (an exported artifact, llama.cpp) that gives logits one window at a
    time: `logits_of_window(row)` for row = [BOS, t1, .., tn] yields n logit rows [vocab], the i-th predicting
    row[i + 1]. Each row is scored by nano.scoring.nll as it comes, so no window's logits are ever held at once."""
    from nano.scoring import nll

    tokens, weights = make_windows(ids, window=window, bos_id=bos_id)
    total, count = 0.0, 0
    for row, scored in zip(tokens, weights):
        n = int(scored.sum())
        for i, logits in enumerate(logits_of_window(row[:n + 1])):
            total += float(nll(logits, int(row[i + 1])))
            count += 1
    return {"ppl": math.exp(total / count), "ppl_tokens": count, "ppl_window": window,
            "bits_per_byte": bits_per_byte(total, len(text.encode("utf-8")))}
