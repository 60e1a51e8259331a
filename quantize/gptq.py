"""GPTQ (Frantar et al. 2022): quantize a projection's input rows one at a time and spread each row's rounding
error over the rows not yet quantized, through the inverse Hessian of the output error ‖X W − X Ŵ‖².

Written here rather than taken from qwix (`qwix.contrib.gptq_core`): qwix's version unrolls the column loop in
eager JAX (33 s for one 64 × 256 layer on this CPU) and has no act-order. This is the reference algorithm (lazy
batch updates, Cholesky of the damped inverse Hessian) in float64 numpy, with act-order by static groups.
"""

from __future__ import annotations

import numpy as np

from nano.quant_scheme import QuantSpec
from nano.quant import QuantizedWeight, absmax_scales


def _scales(w_in_out: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return np.asarray(absmax_scales(w_in_out.astype(np.float32), spec), np.float64)


def inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹ (UᵀU = H⁻¹): row i holds the update weights."""
    h = hessian.copy()
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    lower = np.linalg.cholesky(h)
    inverse = np.linalg.inv(lower)
    return np.linalg.cholesky(inverse.T @ inverse).T


def gptq(kernel: np.ndarray, hessian: np.ndarray, spec: QuantSpec, *, damp: float = 0.01,
         act_order: bool = True, lazy_batch: int = 128) -> QuantizedWeight:
    """Quantize kernel [in, out] (blocks along `in`, spec.axis 0) given H = XᵀX/n [in, in].

    act_order quantizes rows by decreasing H diagonal (most active input first); its block scales are then
    fixed up front from the float weights ("static groups"), so blocks stay contiguous in the stored layout.
    Without it each block's scales come from the weights as updated when the walk reaches the block.
    """
    assert spec.axis == 0, "GPTQ quantizes along a kernel's input rows"
    w = np.asarray(kernel, np.float64).copy()  # [in, out]: row i is input channel i
    h = np.asarray(hessian, np.float64).copy()
    n = w.shape[0]
    block = spec.block(w.shape)
    dead = np.diag(h) == 0  # inputs that are always zero: nothing to preserve
    h[dead, dead] = 1.0
    w[dead] = 0.0
    static = act_order or not spec.blockwise
    scales = _scales(w, spec) if static else np.zeros(spec.scale_shape(w.shape))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[order], h[order][:, order]
    u = inverse_hessian_factor(h, damp)
    lo, hi = spec.code_range
    codes = np.zeros(w.shape, np.int8)
    lazy = max(lazy_batch // block, 1) * block if spec.blockwise else lazy_batch  # blocks never straddle batches
    for start in range(0, n, lazy):
        stop = min(start + lazy, n)
        part, errors = w[start:stop].copy(), np.zeros((stop - start, w.shape[1]))
        for i in range(stop - start):
            row = order[start + i]
            if not static and row % block == 0:  # a block begins: its scales from the weights as they are now
                scales[row // block] = _scales(part[i:i + block], spec)[0]
            s = scales[row // block] if spec.blockwise else scales[0]
            q = np.clip(np.round(part[i] / s), lo, hi)
            codes[start + i] = q
            error = (part[i] - q * s) / u[start + i, start + i]
            part[i:] -= np.outer(u[start + i, start:stop][i:], error)
            errors[i] = error
        w[stop:] -= u[start:stop, stop:].T @ errors
    restored = np.empty_like(codes)
    restored[order] = codes
    return QuantizedWeight(codes=restored, scales=scales.astype(spec.scale_dtype), spec=spec)
