"""How much each part of a teacher matters, measured on calibration tokens: what pruning keeps and what it cuts.

Width (Minitron: Muralidharan et al. 2024, Sreenivas et al. 2024) is scored by activations alone, with no
gradients, so one forward pass over a few thousand tokens ranks every FFN neuron, attention head and embedding
channel. Depth is scored two ways that a caller can compare: Block Influence (ShortGPT: Men et al. 2024), how
much a block turns the residual stream, and the loss a model suffers when that one block is skipped.

Aggregation (Minitron's best for width: "batch L2, sequence mean"). For a quantity a[n, t, k] (row n of the
calibration set, position t, unit k) a row's score is s[n, k] = mean over t of |a[n, t, k]|, and the unit's
importance is the L2 norm over all N rows, sqrt(sum_n s[n, k]²). The sequence mean makes a row's score independent
of its length; the L2 over rows rewards units that are strongly active on some rows over units that are weakly
active on all (a mean would not), which is what the paper found ranks best. Every position is counted, BOS
included: the neurons that build the BOS attention sink must rank high, or pruning breaks every later token.
The L2 grows with sqrt(N), so compare scores measured on the same number of rows.

Everything runs in float32 (whatever the model's compute dtype), one block at a time over batches of rows, each
block a jitted program shared by every block of its kind; logits are made one row at a time (never [N, T, vocab]).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.errors import NanoError
from nano.layers import tap_linear_inputs
from nano.scoring import nll

Progress = Callable[[int, int], None] | None


def _check_tokens(model, tokens, batch_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise NanoError(f"calibration tokens must be [N, T] with N >= 1 and T >= 2, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise NanoError(f"calibration tokens must be integer ids, got {tokens.dtype}")
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise NanoError(f"calibration token ids must lie in [0, {vocab}), got {tokens.min()}..{tokens.max()}")
    if batch_size < 1:
        raise NanoError(f"batch_size must be positive, got {batch_size}")
    return tokens.astype(np.int32)


def _positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _inputs(model, tokens: np.ndarray, batch_size: int) -> list[tuple[jax.Array, jax.Array]]:
    """(float32 residual stream after the embedding, tokens) per batch of rows."""
    batches = [jnp.asarray(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]
    return [(model.embedder.encode(b, jnp.float32), b) for b in batches]


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions)[0]


@functools.partial(jax.jit, static_argnums=0)
def _block_width(graphdef, state, x, positions):
    """One block on x [B, T, d] → (its output, per-row sequence means [B, ·] of the four scored activations)."""
    block = nnx.merge(graphdef, state)
    roles = {id(block.attn.q_proj): "attn_norm", id(block.mlp.gate): "mlp_norm",
             id(block.attn.o_proj): "heads", id(block.mlp.down): "ffn"}
    seen: dict[str, jax.Array] = {}

    def record(module, value):
        if id(module) in roles:
            seen[roles[id(module)]] = value.astype(jnp.float32)

    with tap_linear_inputs(record):
        out, _ = block(x, positions)
    b, t, _ = x.shape
    # A head's activation at a position is the L2 norm of its head_dim outputs (already >= 0).
    heads = jnp.linalg.norm(seen.pop("heads").reshape(b, t, block.attn.num_heads, block.attn.head_dim), axis=-1)
    means = {name: jnp.mean(jnp.abs(value), axis=1) for name, value in seen.items()}
    return out, {**means, "heads": jnp.mean(heads, axis=1)}


def width_importance(model, tokens, *, batch_size: int = 8, progress: Progress = None) -> dict[str, np.ndarray]:
    """Activation importance of every FFN neuron, query head and embedding channel on `tokens` [N, T].

    Returns {"ffn": [L, F], "heads": [L, H], "channels": [d], "rows": N, "tokens": N·T}: per-unit scores, batch L2
    of sequence means (module docstring) of, respectively, the input of `mlp.down`; the L2 norm of each head's
    slice of the input of `attn.o_proj`; and the outputs of `attn_norm` and `mlp_norm` (the inputs of `q_proj`
    and `gate`), whose per-layer scores are summed over both norms of every layer.
    """
    tokens = _check_tokens(model, tokens, batch_size)
    batches = _inputs(model, tokens, batch_size)
    squares: dict[str, list[np.ndarray]] = {"ffn": [], "heads": [], "attn_norm": [], "mlp_norm": []}
    for index, block in enumerate(model.layers):
        graphdef, state = nnx.split(block)
        sums: dict[str, np.ndarray] = {}
        for i, (x, ids) in enumerate(batches):
            out, means = _block_width(graphdef, state, x, _positions(ids))
            for name, value in means.items():  # Σ over rows of s[n, k]², in float64
                sums[name] = sums.get(name, 0.0) + np.sum(np.square(np.asarray(value, np.float64)), axis=0)
            batches[i] = (out, ids)
        for name, value in sums.items():
            squares[name].append(np.sqrt(value))
        if progress:
            progress(index + 1, len(model.layers))
    channels = np.sum(squares["attn_norm"], axis=0) + np.sum(squares["mlp_norm"], axis=0)
    return {"ffn": np.stack(squares["ffn"]), "heads": np.stack(squares["heads"]), "channels": channels,
            "rows": int(tokens.shape[0]), "tokens": int(tokens.size)}


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(graphdef, state, x, tokens):
    """Σ next-token NLL of tokens[:, 1:] given the residual stream x [B, T, d] after the last block, through the
    final norm and the tied head, one row's logits [T-1, vocab] at a time."""
    model = nnx.merge(graphdef, state)
    hidden = model.final_norm(x)

    def row(args):
        h, ids = args
        return jnp.sum(nll(model.head(h[:-1]), ids[1:]))

    return jnp.sum(jax.lax.map(row, (hidden, tokens)))


@jax.jit
def _cos_sum(x, y):
    """Σ over rows and the scored positions 0..T-2 of cos(x, y) along d_model."""
    x, y = x[:, :-1], y[:, :-1]
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return jnp.sum(jnp.sum(x * y, axis=-1) / jnp.maximum(norms, 1e-30))


def _batch_layer_sums(whole, blocks, x, ids) -> tuple[np.ndarray, np.ndarray]:
    """For one batch: (NLL sums [L + 1] — the full model, then each layer skipped — and cos sums [L]). `whole` is
    the split model (for its final norm and head), `blocks` each block split.

    Skipping layer i shares layers 0..i-1 with the full model, so the walk keeps one residual stream per skipped
    layer seen so far and runs each later block on all of them: L(L-1)/2 block passes beyond the full model's,
    where running each skipped model from the embedding would take L(L-1).
    """
    positions = _positions(ids)
    skipped: list[jax.Array] = []  # skipped[i]: the stream with layer i skipped
    cos = np.zeros(len(blocks))
    for j, (graphdef, state) in enumerate(blocks):
        out = _run_block(graphdef, state, x, positions)
        cos[j] = float(_cos_sum(x, out))
        skipped = [_run_block(graphdef, state, y, positions) for y in skipped] + [x]
        x = out
    nll = np.array([float(_nll_sum(*whole, y, ids)) for y in [x, *skipped]])
    return nll, cos


def layer_importance(model, tokens, *, batch_size: int = 8, progress: Progress = None) -> dict:
    """Depth importance of every layer on `tokens` [N, T] (BOS first, every token real text).

    Scored positions are 0..T-2 (each predicts the next token; the last predicts nothing). Returns
    {"block_influence": [L] = 1 − mean cos(block input, block output) over scored positions of every row,
     "drop_nll": [L] = mean NLL (nats/token) of tokens[:, 1:] with layer i replaced by the identity, minus
     "nll": the full model's mean NLL, "tokens": the number of scored tokens N·(T-1)}.
    A layer that matters little has both small; they need not agree (cosine sees direction only, and a block can
    turn the stream a lot in a direction the head ignores).
    """
    tokens = _check_tokens(model, tokens, batch_size)
    whole, blocks = nnx.split(model), [nnx.split(block) for block in model.layers]
    nll, cos = np.zeros(len(blocks) + 1), np.zeros(len(blocks))
    batches = _inputs(model, tokens, batch_size)
    for done, (x, ids) in enumerate(batches, 1):
        batch_nll, batch_cos = _batch_layer_sums(whole, blocks, x, ids)
        nll, cos = nll + batch_nll, cos + batch_cos
        if progress:
            progress(done, len(batches))
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    mean = nll / count
    return {"block_influence": 1.0 - cos / count, "drop_nll": mean[1:] - mean[0], "nll": float(mean[0]),
            "tokens": int(count)}
