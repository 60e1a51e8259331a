"""Online Hadamard rotations (QuaRot's, computed in the model): a projection's input multiplied by a block-diagonal
Hadamard matrix and its kernel stored multiplied by the same matrix, so the model computes what it did.

Two are applied, each recorded in the config: `ffn_rotation` on the GELU-gated product entering `mlp.down` (QuaRot's
R4), and `input_rotation` on each block's normed inputs entering q/k/v and gate/up (where QuaRot rotates the
residual stream itself, R1, which Gemma 3's post-attention and post-MLP norms do not let through).

Why: those inputs carry a few channels far larger than the rest (Gemma's outliers of hundreds), and int4 blocks
along the input dimension, and the device's int8 rounding of each input row, spend their range on them. A Hadamard
matrix spreads every channel over all the channels of its block, so the rotated input and kernel rows have no
outliers to round around. H/√n is orthogonal and symmetric, so it is its own inverse: one function both folds the
rotation into a kernel and takes it out again (for formats whose runtimes know no rotation: GGUF, safetensors).

    kernel = rotate_rows(kernel, block)   # [in, out]: blockdiag(H) @ kernel; applied twice, the identity
    h = rotate_last(h, block)             # [..., in]: h @ blockdiag(H), in the model
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix H/√n [n, n] (n a power of two), float32; symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    out = (h / np.sqrt(n)).astype(np.float32)
    out.flags.writeable = False
    return out


def rotate_last(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """x [..., n] times blockdiag(H_block): each run of `block` channels rotated on its own."""
    h = jnp.asarray(hadamard(block), x.dtype)
    return jnp.matmul(x.reshape(*x.shape[:-1], -1, block), h).reshape(x.shape)


def rotate_rows(kernel: np.ndarray, block: int) -> np.ndarray:
    """blockdiag(H_block) @ kernel for a float kernel [n, out] (in float64, returned in the kernel's dtype)."""
    w = np.asarray(kernel)
    rotated = np.matmul(hadamard(block).astype(np.float64), w.astype(np.float64).reshape(-1, block, w.shape[-1]))
    return rotated.reshape(w.shape).astype(w.dtype)


# The kernels whose input each config field rotates.
ROTATED_KERNELS = {"ffn_rotation": ("mlp.down",),
                   "input_rotation": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate", "mlp.up")}


def rotated_params(config, params: dict, ffn: int | None, inputs: int | None = None):
    """(config, params) with every layer's kernels rotated for `ffn_rotation = ffn` and `input_rotation = inputs`
    (each a block size, None for none), from whatever rotations `config` has: (None, None) gives the plain Gemma 3
    parametrization. Float params."""
    out = dict(params)
    for field, block in (("ffn_rotation", ffn), ("input_rotation", inputs)):
        have = getattr(config, field)
        if have == block:
            continue
        for i in range(config.num_layers):
            for kernel in ROTATED_KERNELS[field]:
                name = f"layers.{i}.{kernel}.kernel"
                w = out[name] if have is None else rotate_rows(out[name], have)  # back to plain, then the new one
                out[name] = w if block is None else rotate_rows(w, block)
    return dataclasses.replace(config, ffn_rotation=ffn, input_rotation=inputs), out
