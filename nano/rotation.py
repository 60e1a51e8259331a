"""The MLP's Hadamard rotation (QuaRot's online R4): the down projection's input multiplied by a block-diagonal
Hadamard matrix, the down kernel stored multiplied by the same matrix, so the model computes what it did.

Why: the GELU-gated product that enters `mlp.down` carries a few channels far larger than the rest, and int4 blocks
along the input dimension (and the device's int8 rounding of that input) spend their range on them. A Hadamard
matrix spreads every channel over all the channels of its block, so the rotated input and kernel rows have no
outliers to round around. H/√n is orthogonal and symmetric, so it is its own inverse: one function both folds the
rotation into a kernel and takes it out again (for formats whose runtimes know no rotation: GGUF, safetensors).

    kernel = rotate_rows(kernel, block)   # [ffn, d_model]: blockdiag(H) @ kernel; applied twice, the identity
    h = rotate_last(h, block)             # [..., ffn]: h @ blockdiag(H), in the model
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


def rotated_params(config, params: dict, block: int | None):
    """(config, params) with every layer's down kernel rotated by blockdiag(H_block) and `ffn_rotation` set to
    `block`; `block=None` takes a rotated model's rotation out (the plain Gemma 3 parametrization). Float params."""
    step = block or config.ffn_rotation
    if step is None or block == config.ffn_rotation:
        return config, params
    if block is not None and config.ffn_rotation is not None:
        config, params = rotated_params(config, params, None)
    out = dict(params)
    for i in range(config.num_layers):
        name = f"layers.{i}.mlp.down.kernel"
        out[name] = rotate_rows(params[name], step)
    return dataclasses.replace(config, ffn_rotation=block), out
