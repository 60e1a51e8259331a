"""Model FLOPs utilisation: the model's FLOPs per second over the machine's peak, both measured here.

The peak is not a datasheet figure (a CPU's depends on its vector units, clocks and core count): it is the best of
a few large matmuls timed in the same process, so MFU says how far the training step is from what XLA reaches on
dense matrix products on this very machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from nano.config import ModelConfig


def measure_peak_flops(dtype=jnp.float32, *, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` [size, size] @ [size, size] products (2·size³ FLOPs each)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def train_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward + backward (3 × forward) FLOPs per trained token. A causal row of seq_len tokens attends to
    seq_len / 2 earlier tokens on average."""
    return 3 * config.flops_per_token(seq_len // 2)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return config.flops_per_token(seq_len // 2)
