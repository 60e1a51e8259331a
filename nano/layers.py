"""The decoder's building blocks: RMSNorm, Linear, the (tied) embedding, rotary position embedding.

Every weight goes through `as_array`, so a weight is a float array or a `QuantizedWeight` (int codes + scales)
and every stage runs either through the same modules.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nano.quant import QuantizedWeight, dynamic_int8

# Calibration (GPTQ, AWQ) needs the input of every projection. Inside `tap_linear_inputs(fn)` each Linear calls
# fn(module, x) before its matmul; outside it nothing happens (the check runs at trace time, not in the program).
_LINEAR_INPUT_TAP: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("linear_input_tap", default=None)


# The LiteRT export wants the embedding as one EMBEDDING_LOOKUP op (which it can quantize) rather than a gather;
# inside `export_lookups()` the lookup is wrapped in the composite the converter maps to it. Outside it is a plain
# take, since JAX cannot differentiate through a composite.
_EXPORT_LOOKUPS: contextvars.ContextVar[bool] = contextvars.ContextVar("export_lookups", default=False)


@contextlib.contextmanager
def export_lookups():
    token = _EXPORT_LOOKUPS.set(True)
    try:
        yield
    finally:
        _EXPORT_LOOKUPS.reset(token)


def _lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    if not _EXPORT_LOOKUPS.get():
        return jnp.take(table, tokens, axis=0)
    ids = tokens.reshape(-1).astype(jnp.int32)
    rows = jax.lax.composite(lambda i, t: jnp.take(t, i, axis=0), name="odml.embedding_lookup")(ids, table)
    return rows.reshape(*tokens.shape, table.shape[-1])


# The device's arithmetic (`Decoder.as_device`): inside `device_arithmetic(True)` a projection with integer weights
# first rounds its input to int8 per row, as XNNPACK does at run time (nano.quant.dynamic_int8). Read at trace time:
# the Decoder sets it from a static attribute, so a jitted program is never reused across the two.
_DEVICE_ARITHMETIC: contextvars.ContextVar[bool] = contextvars.ContextVar("device_arithmetic", default=False)


@contextlib.contextmanager
def device_arithmetic(on: bool):
    token = _DEVICE_ARITHMETIC.set(on)
    try:
        yield
    finally:
        _DEVICE_ARITHMETIC.reset(token)


def integer_input(x: jax.Array, weight) -> jax.Array:
    """What an integer layer multiplies: x itself, or under `device_arithmetic` x rounded to int8 per row."""
    return dynamic_int8(x) if isinstance(weight, QuantizedWeight) and _DEVICE_ARITHMETIC.get() else x


@contextlib.contextmanager
def tap_linear_inputs(fn: Callable[["Linear", jax.Array], None]):
    token = _LINEAR_INPUT_TAP.set(fn)
    try:
        yield
    finally:
        _LINEAR_INPUT_TAP.reset(token)


def as_array(weight: jax.Array | QuantizedWeight, dtype) -> jax.Array:
    """The weight in `dtype`: a float array cast, a quantized one dequantized."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight.astype(dtype)


def matmul_weight(x: jax.Array, weight: jax.Array | QuantizedWeight) -> jax.Array:
    """x [..., in] @ weight [in, out] in x's dtype (the compute dtype), accumulating in float32."""
    x = integer_input(x, weight)
    return jnp.matmul(x, as_array(weight, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32.

    `scale` is the full multiplier (GGUF convention, which already holds the +1 of Gemma's `(1 + w)`), so it is
    initialised to ones.
    """

    def __init__(self, dim: int, *, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class Linear(nnx.Module):
    """A bias-free projection with kernel [in, out], initialised with variance 1/in."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, out_dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        tap = _LINEAR_INPUT_TAP.get()
        if tap is not None:
            tap(self, x)
        return matmul_weight(x, self.kernel.get_value())


class Embedder(nnx.Module):
    """Token embedding [vocab, d_model], also the output head (tied, `Decoder.head`), as in every Gemma."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
        # std 1/sqrt(d): after the sqrt(d) input scaling activations start near unit scale, and the tied head
        # gives unit-scale logits from normalised states.
        init = jax.nn.initializers.normal(stddev=d_model**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), jnp.float32))

    def encode(self, tokens: jax.Array, dtype) -> jax.Array:
        table = self.embedding.get_value()
        if isinstance(table, QuantizedWeight):  # dequantize the looked-up rows only
            x = table.take(tokens, dtype)
        else:
            x = _lookup(table, tokens).astype(dtype)
        # Gemma multiplies by sqrt(d_model) rounded to the compute dtype.
        return x * jnp.asarray(table.shape[-1] ** 0.5, dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
    """Rotary embedding, split-half (NEOX) layout. x [B, T, heads, head_dim], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
