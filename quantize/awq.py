"""AWQ (Lin et al. 2023): scale up the input channels that see large activations before rounding, and fold the
inverse scale into the operation that produces those inputs, so the float function is unchanged and only the
rounding error moves away from the salient channels. Then a per-block clipping search.

Both searches minimise the projection's output error on the calibration set, tr(ΔWᵀ H ΔW) with H = XᵀX/n, which
is exactly mean ‖X W − X Ŵ‖² without keeping X. qwix's AWQ (`qwix.contrib.awq_core`) weighs the error by the
diagonal only and keeps the scale as a runtime multiply that LiteRT's int4 kernels do not take; here the scale is
folded into the preceding RMSNorm (q/k/v, gate/up), into v_proj's output columns (o_proj) or into up's (down).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nano.quant_scheme import QuantSpec
from nano.quant import QuantizedWeight, absmax_scales, codes_for

RATIOS = np.linspace(0.0, 1.0, 20)  # salience exponents searched
CLIPS = np.linspace(1.0, 0.5, 11)  # block-maximum fractions searched


@functools.partial(jax.jit, static_argnums=(3,))
def _scaled_error(kernels, hessian, channel_scale, specs: tuple[QuantSpec, ...]):
    """Σ over kernels of tr(ΔᵀHΔ), Δ = W − Q(s·W)/s, with s scaling the input rows (each kernel in its spec)."""
    total = 0.0
    for w, spec in zip(kernels, specs):
        scaled = w * channel_scale[:, None]
        q = _rtn(scaled, spec) / channel_scale[:, None]
        delta = w - q
        total += jnp.sum(delta * (hessian @ delta))
    return total


def _rtn(w, spec: QuantSpec, clip=1.0):
    """w rounded to nearest with its block maxima clipped at `clip`, dequantized (float32)."""
    scales = absmax_scales(w, spec, clip=clip)
    return QuantizedWeight(codes=codes_for(w, scales, spec), scales=scales, spec=spec).dequantize()


def search_scale(kernels: list[np.ndarray], hessian: np.ndarray, mean_abs: np.ndarray, specs: list[QuantSpec],
                 *, heads: tuple[int, int, int] | None = None) -> np.ndarray:
    """The per-input-channel scale s = mean|x|^α (normalised) with the α that minimises the kernels' output error.

    `heads` = (kv_heads, queries per kv head, head_dim) for o_proj's input: the query heads that share a KV head
    share one scale, since it is folded into that KV head's values."""
    salience = np.maximum(mean_abs, 1e-8)
    if heads is not None:
        salience = np.broadcast_to(salience.reshape(heads).mean(1, keepdims=True), heads).reshape(-1)
    kernels = [jnp.asarray(k, jnp.float32) for k in kernels]
    h = jnp.asarray(hessian, jnp.float32)
    best, best_scale = None, np.ones_like(salience)
    for ratio in RATIOS:
        s = salience ** ratio
        s = s / np.sqrt(s.max() * s.min())  # centred in log space: scales neither all up nor all down
        error = float(_scaled_error(kernels, h, jnp.asarray(s, jnp.float32), tuple(specs)))
        if best is None or error < best:
            best, best_scale = error, s
    return best_scale


@functools.partial(jax.jit, static_argnums=(2,))
def _clip_errors(w, hessian, spec: QuantSpec, clip):
    """Output error of each (block, output column) when every block is clipped at `clip` × its maximum:
    Σ_ij Δ_i H_ij Δ_j within the block (AWQ's per-block search ignores cross-block terms too)."""
    block = spec.block(w.shape)
    delta = (w - _rtn(w, spec, clip)).reshape(-1, block, w.shape[1])  # [blocks, block, out]
    blocks = delta.shape[0]
    h = hessian.reshape(blocks, block, blocks, block)[jnp.arange(blocks), :, jnp.arange(blocks), :]  # [G, B, B]
    return jnp.einsum("gbo,gbc,gco->go", delta, h, delta)


def clip_and_quantize(kernel: np.ndarray, hessian: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest with, per block and output column, the clipped maximum that minimises the output error."""
    w, h = jnp.asarray(kernel, jnp.float32), jnp.asarray(hessian, jnp.float32)
    errors = jnp.stack([_clip_errors(w, h, spec, float(c)) for c in CLIPS])  # [clips, G, out]
    best = jnp.asarray(CLIPS, jnp.float32)[jnp.argmin(errors, axis=0)]  # [G, out]
    scales = absmax_scales(w, spec, clip=best)
    return QuantizedWeight(codes=codes_for(w, scales, spec), scales=scales.astype(spec.scale_dtype), spec=spec)
