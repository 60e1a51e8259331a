"""Quantized weights: the format every stage runs, and round-to-nearest, the scheme's own rounding.

A weight is either a float array or a `QuantizedWeight` (integer codes + scales). The decoder's layers take both
(`nano.layers`), so quantization replaces parameters, never modules.

The scheme is the one LiteRT's kernels consume, so the export carries codes and scales unchanged:
- symmetric (zero point 0), scales per block of `block_size` consecutive elements along the contraction axis
  (the input dimension of a projection, d_model of the embedding), or per channel (one block spans the axis);
- int4 blockwise: codes in [-8, 7], scales stored as float16 whose values are exactly bfloat16 numbers (LiteRT's
  BlockwiseQuantization stores FLOAT16 scales rounded to bfloat16, which XNNPACK's kernels use);
- per channel (int8, or int4): float32 scales; int8 codes in [-127, 127] (TFLite's int8 weight range).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nano.quant_scheme import QuantSpec

_MIN_SCALE, _MAX_SCALE = 2.0 ** -14, 2.0 ** 15  # float16's normal range: a stored scale is exact there


@flax.struct.dataclass
class QuantizedWeight:
    """codes (int8 values in the spec's range, the float weight's shape) and scales (the spec's scale shape)."""

    codes: jax.Array
    scales: jax.Array
    spec: QuantSpec = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return _expand(self.codes, self.scales, self.spec.axis).astype(dtype)

    def take(self, indices: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Rows `indices` of a weight quantized along axis 1 (the embedding lookup), dequantized: only the rows
        looked up are expanded, never the whole table."""
        assert self.spec.axis == 1, "row lookup needs blocks along the rows"
        codes, scales = jnp.take(self.codes, indices, axis=0), jnp.take(self.scales, indices, axis=0)
        return _expand(codes, scales, -1).astype(dtype)  # the rows' blocks now run along the last axis


def _expand(codes, scales, axis: int) -> jax.Array:
    """codes * (each block's scale), in float32; blocks along `axis`."""
    block = codes.shape[axis] // scales.shape[axis]
    scales = jnp.repeat(scales.astype(jnp.float32), block, axis=axis)
    return codes.astype(jnp.float32) * scales


def _blocked(w: jax.Array, spec: QuantSpec):
    """w with its contraction axis split as (blocks, block): [..., blocks, block, ...]."""
    a, block = spec.axis, spec.block(w.shape)
    return w.reshape(*w.shape[:a], w.shape[a] // block, block, *w.shape[a + 1:])


def round_scale(scale: jax.Array, spec: QuantSpec) -> jax.Array:
    """Scales as they will be stored. Blockwise: rounded *up* to a bfloat16 number within float16's normal range,
    so |w| / scale never exceeds the bound (round-trip error stays within scale / 2) and float16 holds it exactly."""
    scale = jnp.asarray(scale, jnp.float32)
    if not spec.blockwise:
        return jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
    bits = jax.lax.bitcast_convert_type(jnp.clip(scale, _MIN_SCALE, _MAX_SCALE), jnp.uint32)
    bits = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)  # ceil to the 8-bit mantissa of bfloat16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def absmax_scales(w: jax.Array, spec: QuantSpec, *, clip: jax.Array | float = 1.0) -> jax.Array:
    """The rounded scale of every block: max |w| over the block (times `clip`) / the bound. [scale shape]"""
    blocked = _blocked(jnp.asarray(w, jnp.float32), spec)
    absmax = jnp.max(jnp.abs(blocked), axis=spec.axis + 1)
    return round_scale(absmax * clip / spec.bound, spec)


def codes_for(w: jax.Array, scales: jax.Array, spec: QuantSpec) -> jax.Array:
    """Round-to-nearest codes of w under given scales, clipped to the code range (int8)."""
    lo, hi = spec.code_range
    blocked = _blocked(jnp.asarray(w, jnp.float32), spec)
    q = jnp.round(blocked / jnp.expand_dims(scales, spec.axis + 1))
    return jnp.clip(q, lo, hi).astype(jnp.int8).reshape(w.shape)


def quantize_rtn(w: jax.Array, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest with absmax scales: every element within scale / 2 of its value."""
    scales = absmax_scales(w, spec)
    return QuantizedWeight(codes=codes_for(w, scales, spec), scales=scales.astype(spec.scale_dtype), spec=spec)


def dynamic_int8(x: jax.Array) -> jax.Array:
    """x as XNNPACK sees it entering an integer layer, its "qd8" dynamic quantization, returned dequantized in x's
    dtype: each row (token) rounded to int8 with its own scale and zero point, so that 255 steps span the row's
    range widened to hold 0 (XNNPACK `xnn_f32_qd8_asymmetric_quantization_params` and the f32-qs8 convert kernel,
    all in float32, rounding half to even). The layer then multiplies those codes with its integer weights
    exactly and scales the sums: this row times the dequantized weight, up to the order of float additions.
    The AVX512-VNNI kernels shift the codes to unsigned (q + 128, zero point + 128), which changes no value.
    Gemma's activations carry outliers of hundreds in a few dimensions, so one row's step is coarse for all the
    rest: the cost the artifact pays and the plain JAX model does not see."""
    x32 = x.astype(jnp.float32)
    lo = jnp.minimum(jnp.min(x32, axis=-1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x32, axis=-1, keepdims=True), 0.0)
    mult = jnp.where(hi > lo, 255.0 / jnp.where(hi > lo, hi - lo, 1.0), 1.0)  # codes per unit
    low_end, high_end = lo * mult, hi * mult
    # The zero point from whichever end of the range rounds with the smaller error, as XNNPACK chooses it.
    zero_point = jnp.where((-128.0 + low_end) + (127.0 + high_end) > 0, -128.0 - low_end, 127.0 - high_end)
    zero_point = jnp.round(jnp.clip(zero_point, -128.0, 127.0))
    q = jnp.clip(jnp.round(x32 * mult) + zero_point, -128.0, 127.0)
    return ((q - zero_point) * (1.0 / mult)).astype(x.dtype)


def fake_quantize(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """w rounded onto its int grid in the forward pass, identity in the backward pass (straight-through)."""
    q = quantize_rtn(jax.lax.stop_gradient(w), spec).dequantize(w.dtype)
    return w + jax.lax.stop_gradient(q - w)


# Storage: int4 codes two per byte along the contraction axis, the even element in the low nibble (TFLite's
# packing once a [in, out] kernel is laid out [out, in]).

def pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    codes = np.moveaxis(np.asarray(codes, np.int8), axis, -1)
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even length along axis {axis}, got {codes.shape[-1]}")
    nibbles = (codes & 0x0F).astype(np.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return np.moveaxis(packed, -1, axis)


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    packed = np.moveaxis(np.asarray(packed, np.uint8), axis, -1)
    low, high = (packed & 0x0F).astype(np.int8), (packed >> 4).astype(np.int8)
    codes = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    codes = np.where(codes > 7, codes - 16, codes).astype(np.int8)  # two's complement nibbles
    return np.moveaxis(codes, -1, axis)


def quantize_params(params: dict, specs: dict[str, QuantSpec]) -> dict:
    """Flat parameters with those named in `specs` rounded to nearest (the rest as they are)."""
    return {name: quantize_rtn(value, specs[name]) if name in specs else value for name, value in params.items()}
