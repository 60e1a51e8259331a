"""Calibration for GPTQ and AWQ: walk the decoder block by block over calibration sequences and give each block's
projections their input statistics, then run the block (as the method left it, quantized) to make the next
block's inputs. Later blocks thus see the error of the earlier ones and can compensate (the GPTQ reference's
sequential order).

For each distinct projection input X (q/k/v share one, gate/up share one) the walk gathers H = XᵀX / n (the
Hessian of the output error ‖X W − X Ŵ‖², up to a factor) and mean |x| per channel (AWQ's salience).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.layers import Linear, tap_linear_inputs


@dataclasses.dataclass
class InputStats:
    """Statistics of one projection input over the calibration tokens (float64 on the host)."""

    hessian: np.ndarray  # [in, in]  XᵀX / n
    mean_abs: np.ndarray  # [in]
    tokens: int


def _linear_names(block) -> dict[int, str]:
    return {id(m): ".".join(map(str, path)) for path, m in nnx.iter_modules(block) if isinstance(m, Linear)}


def _block_stats(graphdef, state, x, positions):
    """Run one block on x [B, T, d], gathering per distinct projection input: (XᵀX, Σ|x|). Returns
    (names → input index, per-input sums, block output)."""
    block = nnx.merge(graphdef, state)
    names = _linear_names(block)
    inputs: dict[int, jax.Array] = {}
    which: dict[str, int] = {}

    def record(module, value):
        key = id(value)  # q, k and v receive the same array: one statistic for the three
        if key not in inputs:
            inputs[key] = value.reshape(-1, value.shape[-1]).astype(jnp.float32)
        which[names[id(module)]] = list(inputs).index(key)

    with tap_linear_inputs(record):
        out, _ = block(x, positions)
    sums = [(jnp.matmul(v.T, v, precision="highest"), jnp.sum(jnp.abs(v), axis=0)) for v in inputs.values()]
    return which, sums, out


def walk_blocks(model, tokens: np.ndarray, on_block: Callable[[int, object, dict[str, InputStats]], None], *,
                batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> InputStats:
    """For each block in order: gather its projections' input statistics over `tokens` [N, T] (inputs made by
    the blocks before it, as already processed), call on_block(index, block, {"attn.q_proj": stats, ...}) to
    quantize it in place, then run it to make the next block's inputs. Returns the statistics of the output
    head's input: the last block's output, final-normed, as the quantized blocks make it."""
    n, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (min(batch_size, n), t))
    xs = [model.embedder.encode(jnp.asarray(tokens[i:i + batch_size]), model.dtype) for i in range(0, n, batch_size)]
    run = jax.jit(lambda g, s, x, p: nnx.merge(g, s)(x, p)[0], static_argnums=0)
    for index, block in enumerate(model.layers):
        graphdef, state = nnx.split(block)
        which: dict[str, int] = {}  # filled while the first call traces: which input each projection reads

        @jax.jit
        def stats_of(s, x, p):
            names, sums, _ = _block_stats(graphdef, s, x, p)
            which.update(names)
            return sums

        totals = None
        for x in xs:
            sums = [(np.asarray(h, np.float64), np.asarray(a, np.float64))
                    for h, a in stats_of(state, x, positions[: x.shape[0]])]
            totals = sums if totals is None else [(h0 + h, a0 + a) for (h0, a0), (h, a) in zip(totals, sums)]
        count = n * t
        stats = {name: InputStats(totals[i][0] / count, totals[i][1] / count, count) for name, i in which.items()}
        on_block(index, block, stats)
        quantized_graph, quantized_state = nnx.split(block)  # stats_of keeps the float block's graphdef
        xs = [run(quantized_graph, quantized_state, x, positions[: x.shape[0]]) for x in xs]
        if progress:
            progress(index + 1, len(model.layers))
    return _head_stats(model, xs, n * t)


def _head_stats(model, xs: list[jax.Array], count: int) -> InputStats:
    graphdef, state = nnx.split(model.final_norm)

    @jax.jit
    def sums(s, x):
        h = nnx.merge(graphdef, s)(x).reshape(-1, x.shape[-1]).astype(jnp.float32)
        return jnp.matmul(h.T, h, precision="highest"), jnp.sum(jnp.abs(h), axis=0)

    parts = [[np.asarray(a, np.float64) for a in sums(state, x)] for x in xs]
    hessian, mean_abs = (sum(p[i] for p in parts) / count for i in range(2))
    return InputStats(hessian, mean_abs, count)
