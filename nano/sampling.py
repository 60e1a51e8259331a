"""Sampling: greedy, temperature, top-k, top-p, stop tokens; prefill once, then decode token by token."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from nano.errors import NanoError
from nano.kv_cache import KVCache
from nano.model import Decoder


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k / top_p of None keep the whole distribution."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise NanoError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise NanoError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise NanoError(f"top-p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] → token ids [B]."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Compiled prefill and decode steps for one model; reuse it across prompts."""

    def __init__(self, model: Decoder, sampling: SamplingConfig):
        self.config = model.config
        self.sampling = sampling
        self.cache_dtype = model.dtype
        graphdef, self.state = nnx.split(model)

        def step(state, tokens, positions, cache, key):
            logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache=cache)
            return sample_logits(logits[:, -1], key, sampling), cache

        self._step = jax.jit(step, donate_argnums=(3,))

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, seed: int = 0,
               stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
        """Yield new token ids one by one until a stop id (not yielded) or max_new_tokens."""
        if not prompt_ids:
            raise NanoError("the prompt is empty (it needs at least BOS)")
        total = len(prompt_ids) + max_new_tokens
        if total > self.config.max_seq_len:
            raise NanoError(f"prompt + new tokens = {total} exceeds the model's context of {self.config.max_seq_len}")
        cache_length = max(total, min(_bucket(total), self.config.max_seq_len))
        cache = KVCache.zeros(self.config, 1, cache_length, dtype=self.cache_dtype)
        key = jax.random.key(seed)
        tokens = jnp.asarray([prompt_ids], jnp.int32)
        positions = jnp.arange(len(prompt_ids), dtype=jnp.int32)[None]
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            next_token, cache = self._step(self.state, tokens, positions, cache, sub)
            token = int(next_token[0])
            if token in stop_ids:
                return
            yield token
            tokens = next_token[:, None]
            positions = jnp.asarray([[len(prompt_ids) + i]], jnp.int32)

    def generate(self, prompt_ids: list[int], **kwargs) -> list[int]:
        return list(self.stream(prompt_ids, **kwargs))


def _bucket(length: int, multiple: int = 256) -> int:
    """Round the cache length up so nearby requests share one compiled decode step."""
    return -(-length // multiple) * multiple


class TextStream:
    """Generated ids → text as it becomes printable. A byte-fallback piece can be part of a UTF-8 character, so the
    ids so far are decoded whole each time and text is released only when it does not end in a half character
    (U+FFFD); `flush()` releases the rest at the end.

        stream = TextStream(tokenizer)
        for token in generator.stream(...):
            print(stream.push(token), end="")
        print(stream.flush())
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """The new printable text after `token` ('' while a character is incomplete)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        """Whatever is left, incomplete characters included."""
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[len(self.shown):], text
        return new
