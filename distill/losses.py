"""Distillation losses: forward KL, reverse KL and generalised JSD(β) at a temperature, mixed with cross-entropy.

    loss, metrics = distill_loss(student_logits, targets, weights, teacher, kind="fkl", alpha=0.0, temperature=1.0)
    loss, metrics = distill_loss_from_hidden(hidden, model.head, embedding, targets, weights, sparse_teacher, ...)

loss = α·CE + (1 − α)·τ²·KD, each a weighted mean over tokens. CE is the next-token cross-entropy on the data's
`targets` at temperature 1 (the caller shifts: targets[:, t] is the token after position t). KD compares the
teacher P = softmax(t/τ) with the student Q = softmax(s/τ), and is multiplied by τ² so its gradients keep their
scale as τ changes (Hinton et al. 2015). Kinds:

- "fkl": KL(P‖Q), forward (mode covering; what Gemma 3 uses).
- "rkl": KL(Q‖P), reverse (mode seeking; MiniLLM).
- "jsd": generalised JSD(β) = β·KL(P‖M) + (1 − β)·KL(Q‖M), M = βP + (1 − β)Q (GKD's convention; β = 0.5 is the
  symmetric Jensen-Shannon divergence, bounded by log 2). 0 < β < 1: JSD(β) → 0 at both ends, where
  JSD(β)/β → KL(P‖Q) and JSD(β)/(1 − β) → KL(Q‖P); use "fkl" or "rkl" for those limits.
- "ce": cross-entropy only (α is ignored); no teacher needed.

The teacher is full logits [B, T, V] or a `SparseTeacher` (k ids per token with their full-vocabulary log-probs,
as Gemma 3 stores 256 sampled teacher logits per token). With a sparse teacher, P̃ is the teacher renormalised over
its k ids at τ. "fkl" is the cross-entropy of P̃ against the student's full-vocabulary log-softmax, minus P̃'s
entropy: Σ P̃ log(P̃/Q) ≥ 0, and 0 only when the student matches the teacher and puts no mass outside the k ids.
"rkl" and "jsd" restrict the student to the same k ids too, renormalised there (a reverse KL needs the teacher
everywhere the student has mass). Ids whose teacher log-prob is -inf (k above the teacher's support) are left out.

Renormalising teaches the student to drop the teacher's mass outside the k ids: harmless for a sharp teacher, a
steady pull away from the teacher for a flat one (the top 256 of a perplexity-150 model hold a fraction of its
mass), and fatal to QAT, whose targets are the model's own float probabilities. With `rest=True` (τ = 1 only)
both sides keep their full-vocabulary probabilities at the k ids and gain one more outcome, everything else,
with mass 1 − Σ: a divergence between two (k + 1)-outcome distributions, never above the full one (they merge
outcomes), equal to it when the k ids hold all the mass, and zero when the student is the teacher.

`distill_loss_from_hidden` never builds [B, T, V] student logits: it scans the vocabulary in chunks (online
logsumexp, the logits at the teacher ids and targets picked up chunk by chunk) and recomputes each chunk on the
backward pass, so peak memory is [B, T, vocab_chunk]. A softcap in `head_fn` is elementwise, so this is exact.

kind, alpha, temperature, beta and vocab_chunk are Python values (static under jit); weights may be fractional.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from distill.settings import LOSS_KINDS as KINDS  # one list, kept where the JAX-free command line reads it
from nano.scoring import fold_chunk, fold_end, fold_start, fold_to_student, kl, nll

_NEG = -1e30  # a finite "minus infinity" for log-probs: exp gives exactly 0, differences and gradients stay finite


@flax.struct.dataclass
class SparseTeacher:
    """k teacher tokens per position: `ids` [B, T, k] int32 and their log-probs [B, T, k] float32 at temperature 1
    over the full vocabulary (as an offline cache stores them; the loss renormalises over the k ids)."""

    ids: jax.Array
    logprobs: jax.Array


def sparse_from_logits(teacher_logits: jax.Array, k: int = 256, *, mode: str = "sample",
                       key: jax.Array | None = None, id_map=None) -> SparseTeacher:
    """The k largest teacher tokens (mode "top") or k drawn by teacher probability without replacement (mode
    "sample", the Gumbel-top-k trick: the k largest of log p + Gumbel noise; ids come in draw order, the first
    being an ordinary sample). Needs `key` for sampling. Zero-probability ids are drawn last, with log-prob -inf.

    `id_map` [V] (numpy; teacher id → student id, `Tokenizer.first_pieces_of`) is for a student with a trimmed
    vocabulary: the teacher becomes a distribution over the student's next piece, each teacher piece's probability
    going to the student piece its text begins with (a dropped "▁foobar" to "▁foo", which is how the student
    spells it), −1 ids left out and the rest renormalised; the k are drawn among the student's pieces."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {teacher_logits.shape[-1]}, got {k}")
    logits = teacher_logits.astype(jnp.float32)
    return _draw(logits if id_map is None else fold_to_student(logits, id_map), k, mode, key)


def _draw(logits, k, mode, key) -> SparseTeacher:
    """The k ids of `sparse_from_logits` from float32 logits [..., V]; V < k (a small trimmed vocabulary) gives
    the k − V extra draws probability 0."""
    vocab = logits.shape[-1]
    if vocab < k:
        logits = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, k - vocab)], constant_values=-jnp.inf)
    ids = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32) % vocab, logits.shape)
    # Ranking needs no normalisation (log p = logits − lse, lse constant per position): one pass for lse, and
    # only the k chosen ids are normalised.
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    if mode == "top":
        scores = logits
    elif mode == "sample":
        if key is None:
            raise ValueError("mode='sample' needs a PRNG key")
        scores = logits + _gumbel(key, logits.shape)
    else:
        raise ValueError(f"mode must be 'sample' or 'top', got {mode!r}")
    best, pick = jax.lax.top_k(scores, k)
    logprobs = jnp.take_along_axis(logits, pick, axis=-1) - lse
    return SparseTeacher(ids=jnp.take_along_axis(ids, pick, axis=-1), logprobs=_drop_excluded(logprobs, best))


def _drop_excluded(logprobs, best):
    """An id reached only because k exceeds the ids allowed (score -inf) gets log-prob -inf: the losses skip it."""
    return jnp.where(best == -jnp.inf, -jnp.inf, logprobs)


def sparse_from_hidden(hidden: jax.Array, head_fn, embedding, k: int = 256, *, mode: str = "sample",
                       key: jax.Array | None = None, vocab_chunk: int = 16384, id_map=None) -> SparseTeacher:
    """`sparse_from_logits(head_fn(hidden, embedding), ...)` without the [B, T, V] logits (34 GB for 8 × 1024
    tokens of a 262k vocabulary in float32, four times over in the sampling): the vocabulary in chunks, a running
    logsumexp, and the k best scores so far merged with each chunk's (the top k of a union are the top k of the
    parts' top k; earlier chunks win ties, as lower ids do in one top_k). `head_fn(hidden, rows)` gives the logits
    of vocabulary rows (e.g. `model.head`); `embedding` may be a QuantizedWeight. Memory: [B, T, k + vocab_chunk].
    With `id_map` (as in `sparse_from_logits`) the chunks' probabilities are summed per student piece first, and
    the k drawn from those: memory [B, T, student vocab + vocab_chunk]."""
    vocab = embedding.shape[0]
    if vocab % vocab_chunk or vocab_chunk <= k:
        return sparse_from_logits(head_fn(hidden, embedding), k, mode=mode, key=key, id_map=id_map)
    if mode not in ("sample", "top"):
        raise ValueError(f"mode must be 'sample' or 'top', got {mode!r}")
    if mode == "sample" and key is None:
        raise ValueError("mode='sample' needs a PRNG key")
    lead = hidden.shape[:-1]
    starts = jnp.arange(vocab // vocab_chunk, dtype=jnp.int32) * vocab_chunk

    def rows_at(start):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, vocab_chunk, axis=0), embedding)

    if id_map is not None:
        id_map = np.asarray(id_map)
        size, targets = int(id_map.max()) + 1, jnp.asarray(id_map)

        def fold(carry, start):
            logits = head_fn(hidden, rows_at(start)).astype(jnp.float32)
            return fold_chunk(carry, logits, jax.lax.dynamic_slice_in_dim(targets, start, vocab_chunk), size), None

        folded, _ = jax.lax.scan(fold, fold_start(lead, size), starts)
        return _draw(fold_end(folded), k, mode, key)

    neg = jnp.full((*lead, k), -jnp.inf, jnp.float32)
    carry = (jnp.full((*lead, 1), -jnp.inf, jnp.float32), jnp.zeros((*lead, 1), jnp.float32),
             neg, jnp.zeros((*lead, k), jnp.int32), neg)

    def step(carry, start):
        high, total, best, best_ids, best_logits = carry
        ids = jnp.broadcast_to(start + jnp.arange(vocab_chunk, dtype=jnp.int32), (*lead, vocab_chunk))
        logits = head_fn(hidden, rows_at(start)).astype(jnp.float32)
        new_high = jnp.maximum(high, logits.max(axis=-1, keepdims=True))
        total = total * jnp.exp(high - new_high) + jnp.exp(logits - new_high).sum(axis=-1, keepdims=True)
        scores = logits if mode == "top" else logits + _gumbel(key, logits.shape, start)
        best, pick = jax.lax.top_k(jnp.concatenate([best, scores], axis=-1), k)
        best_ids = jnp.take_along_axis(jnp.concatenate([best_ids, ids], axis=-1), pick, axis=-1)
        best_logits = jnp.take_along_axis(jnp.concatenate([best_logits, logits], axis=-1), pick, axis=-1)
        return (new_high, total, best, best_ids, best_logits), None

    (high, total, best, ids, logits), _ = jax.lax.scan(step, carry, starts)
    return SparseTeacher(ids=ids, logprobs=_drop_excluded(logits - (high + jnp.log(total)), best))


def _hash32(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a cheap, well-mixed uint32 → uint32 bijection."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _gumbel(key: jax.Array, shape: tuple[int, ...], start: jax.Array | int = 0) -> jax.Array:
    """Standard Gumbel noise from a counter hash. jax.random's threefry costs ~7 s per 2048 × 262,144 draws on two
    CPU cores (more than the teacher's forward pass); hashing (row, column) with a seed from `key` costs ~1 s.
    The last axis holds columns start, start + 1, ...: a vocabulary chunk gets the noise of its own ids."""
    rows = math.prod(shape[:-1])
    seed = jax.random.bits(key, (), jnp.uint32)
    row = _hash32(jnp.arange(rows, dtype=jnp.uint32) ^ _hash32(seed))[:, None]  # a distinct stream per position
    col = (jnp.arange(shape[-1], dtype=jnp.uint32) + jnp.asarray(start, jnp.uint32))[None, :]
    bits = _hash32(col * jnp.uint32(0x9E3779B9) + row)
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return (-jnp.log(-jnp.log(u))).reshape(shape)


def divergence(logp: jax.Array, logq: jax.Array, *, kind: str, beta: float = 0.5) -> jax.Array:
    """The divergence of teacher P from student Q (kind "fkl", "rkl" or "jsd"), from log-probs normalised over the
    same last axis, per position and unscaled (no τ²). Use _NEG rather than -inf for zero probabilities."""
    if kind == "fkl":
        return kl(logp, logq)
    if kind == "rkl":
        return kl(logq, logp)
    if kind == "jsd":
        logm = jnp.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)  # log(βP + (1 − β)Q)
        return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)
    raise ValueError(f"kind must be 'fkl', 'rkl' or 'jsd', got {kind!r}")


def _full_kd(student_logits, teacher_logits, *, kind, temperature, beta):
    """Per-token divergence [B, T] between full teacher and student logits at τ (τ² not applied)."""
    logp = jax.nn.log_softmax(jnp.maximum(teacher_logits.astype(jnp.float32) / temperature, _NEG), axis=-1)
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return divergence(logp, logq, kind=kind, beta=beta)


def sparse_logprobs(teacher: SparseTeacher, temperature: float = 1.0) -> jax.Array:
    """log P̃ [B, T, k]: the teacher at temperature τ renormalised over its k ids (softmax of logprobs / τ, which
    is softmax(logits / τ) restricted to the ids). Ids with log-prob -inf (or NaN) get _NEG: probability 0."""
    valid = jnp.isfinite(teacher.logprobs)
    return jax.nn.log_softmax(jnp.where(valid, teacher.logprobs.astype(jnp.float32) / temperature, _NEG), axis=-1)


# The rest's mass is kept at least this: log(rest) and its gradient stay finite when the k ids hold everything.
_REST_FLOOR = 1e-6


def _with_rest(logprobs: jax.Array) -> jax.Array:
    """[..., k + 1]: the k log-probs and log(1 − Σ exp), the mass on every other token."""
    covered = jnp.minimum(jax.nn.logsumexp(logprobs, axis=-1, keepdims=True), math.log1p(-_REST_FLOOR))
    # log(1 − e^c) two ways, each accurate on its side of −log 2 (Mächler's log1mexp)
    rest = jnp.where(covered > -math.log(2.0), jnp.log(-jnp.expm1(covered)), jnp.log1p(-jnp.exp(covered)))
    return jnp.concatenate([logprobs, rest], axis=-1)


def _sparse_kd(student_at_ids, student_lse, teacher: SparseTeacher, *, kind, temperature, beta, rest=False):
    """Per-token divergence [B, T] against a sparse teacher (τ² not applied).

    student_at_ids [B, T, k]: the student's raw logits at the teacher ids; student_lse [B, T]: logsumexp over the
    whole vocabulary of the student's logits / τ. `rest`: compare k + 1 outcomes instead of renormalising."""
    scaled = student_at_ids.astype(jnp.float32) / temperature
    student_logprobs = scaled - student_lse[..., None]  # the student's full-vocabulary log-probs at the k ids
    valid = jnp.isfinite(teacher.logprobs)
    if rest:
        logp = jnp.where(valid, teacher.logprobs.astype(jnp.float32), _NEG)
        logq = jnp.where(valid, student_logprobs, _NEG)
        return divergence(_with_rest(logp), _with_rest(logq), kind=kind, beta=beta)
    logp = sparse_logprobs(teacher, temperature)
    if kind == "fkl":  # against the student's full-vocabulary distribution
        return kl(logp, student_logprobs)
    logq = jax.nn.log_softmax(jnp.where(valid, scaled, _NEG), axis=-1)  # the student restricted to the k ids
    return divergence(logp, logq, kind=kind, beta=beta)


def _check(kind, alpha, temperature, beta, teacher, rest=False):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1 (use kind 'fkl' or 'rkl' for the limits), got {beta}")
    if kind != "ce" and teacher is None:
        raise ValueError(f"kind {kind!r} needs a teacher")
    if rest and temperature != 1.0:
        raise ValueError("rest=True compares full-vocabulary probabilities, known for the teacher at temperature 1 "
                         f"only; got temperature {temperature}")


def _weighted_mean(x, weights):
    """Σ w·x / Σ w, where w > 0 (0 if every weight is 0; positions with weight 0 cannot leak NaN or inf)."""
    w = weights.astype(jnp.float32)
    total = jnp.sum(w)
    return jnp.sum(w * jnp.where(w > 0, x, 0.0)) / jnp.where(total > 0, total, 1.0)


def _combine(ce, kd, agree, weights, *, kind, alpha, temperature, ce_weights=None):
    """(loss, metrics) from per-token CE [B, T], unscaled KD [B, T] and teacher-student top-1 agreement [B, T].
    `ce_weights` (default `weights`) weigh CE alone: on-policy rows set them to 0, their targets being the
    student's own samples."""
    ce_mean = _weighted_mean(ce, weights if ce_weights is None else ce_weights)
    metrics = {"ce": ce_mean, "tokens": jnp.sum(weights.astype(jnp.float32))}
    if kind == "ce":
        loss = ce_mean
        metrics["kd"] = jnp.zeros((), jnp.float32)
    else:
        kd_mean = temperature ** 2 * _weighted_mean(kd, weights)
        loss = alpha * ce_mean + (1.0 - alpha) * kd_mean
        metrics["kd"] = kd_mean
        metrics["teacher_student_top1"] = _weighted_mean(agree.astype(jnp.float32), weights)
    metrics["loss"] = loss
    return loss, metrics


def _teacher_top1(teacher):
    if isinstance(teacher, SparseTeacher):
        best = jnp.argmax(teacher.logprobs, axis=-1)[..., None]
        return jnp.take_along_axis(teacher.ids, best, axis=-1)[..., 0]
    return jnp.argmax(teacher, axis=-1)


def kd_per_token(student_logits: jax.Array, teacher: jax.Array | SparseTeacher, *, kind: str,
                 temperature: float = 1.0, beta: float = 0.5, rest: bool = False) -> jax.Array:
    """The divergence [B, T] at each position, unscaled (no τ²), from full student logits [B, T, V]."""
    if isinstance(teacher, SparseTeacher):
        at_ids = jnp.take_along_axis(student_logits, teacher.ids, axis=-1)
        lse = jax.nn.logsumexp(student_logits.astype(jnp.float32) / temperature, axis=-1)
        return _sparse_kd(at_ids, lse, teacher, kind=kind, temperature=temperature, beta=beta, rest=rest)
    return _full_kd(student_logits, teacher, kind=kind, temperature=temperature, beta=beta)


def distill_loss(student_logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 teacher: jax.Array | SparseTeacher | None = None, *, kind: str, alpha: float = 0.0,
                 temperature: float = 1.0, beta: float = 0.5,
                 rest: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) from full student logits [B, T, V], next tokens `targets` [B, T] and `weights` [B, T]
    (0 for padding and positions without a next token). `teacher`: logits [B, T, V], a SparseTeacher, or None
    for kind "ce". Metrics: loss, ce, kd (τ²-scaled), teacher_student_top1, tokens (the weight sum). `rest`: a
    sparse teacher's other tokens as one more outcome (see the module's docstring)."""
    _check(kind, alpha, temperature, beta, teacher, rest)
    logits = student_logits.astype(jnp.float32)
    ce = nll(logits, targets)
    if kind == "ce":
        return _combine(ce, None, None, weights, kind=kind, alpha=alpha, temperature=temperature)
    kd = kd_per_token(logits, teacher, kind=kind, temperature=temperature, beta=beta, rest=rest)
    agree = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1)) == _teacher_top1(teacher)
    return _combine(ce, kd, agree, weights, kind=kind, alpha=alpha, temperature=temperature)


def _absorb(carry, logits, start, targets, ids, temperature):
    """Fold one chunk of student logits [B, T, C] for vocabulary ids start..start+C-1 into the running stats."""
    lse, lse_tau, at_target, at_ids, best = carry
    size = logits.shape[-1]

    def pick(index):  # the logits at `index` [B, T, n] that fall in this chunk, 0 elsewhere
        local = index - start
        inside = (local >= 0) & (local < size)
        return jnp.where(inside, jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1), axis=-1), 0.0)

    lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1))
    lse_tau = lse if temperature == 1.0 else jnp.logaddexp(lse_tau, jax.nn.logsumexp(logits / temperature, axis=-1))
    at_target = at_target + pick(targets[..., None])[..., 0]
    at_ids = None if ids is None else at_ids + pick(ids)
    # The running max, not an argmax (a variadic reduction that cost ~15% of a CPU step): top-1 agreement only
    # asks whether the student's logit at the teacher's top id is the largest.
    best = jnp.maximum(best, jnp.max(jax.lax.stop_gradient(logits), axis=-1))
    return lse, lse_tau, at_target, at_ids, best


# Without recomputation the backward pass keeps every chunk's logits: B·T·V float32. Up to this many bytes that
# memory buys ~15% of the step (one head matmul in four); above it the chunks are recomputed.
REMAT_ABOVE_BYTES = 4 * 2**30


def _chunked_student(hidden, head_fn, embedding, targets, ids, *, temperature, vocab_chunk, remat):
    """(lse, lse_tau, logit at target, logits at ids, max logit) of head_fn(hidden, embedding), chunk by chunk."""
    b, t = targets.shape
    vocab = embedding.shape[0]
    neg = jnp.full((b, t), -jnp.inf, jnp.float32)
    at_ids = None if ids is None else jnp.zeros(ids.shape, jnp.float32)
    carry = (neg, neg, jnp.zeros((b, t), jnp.float32), at_ids, neg)

    def fold(carry, rows, start):
        return _absorb(carry, head_fn(hidden, rows).astype(jnp.float32), start, targets, ids, temperature)

    full, rest = divmod(vocab, vocab_chunk)
    if remat is None:
        remat = b * t * vocab * 4 > REMAT_ABOVE_BYTES
    if full:
        def step(carry, start):
            return fold(carry, jax.lax.dynamic_slice_in_dim(embedding, start, vocab_chunk, axis=0), start), None

        if remat:  # keep only the carry per step; the chunk's logits are recomputed for the gradient
            step = jax.checkpoint(step)

        carry, _ = jax.lax.scan(step, carry, jnp.arange(full, dtype=jnp.int32) * vocab_chunk)
    if rest:
        carry = fold(carry, embedding[full * vocab_chunk:], full * vocab_chunk)
    return carry


def distill_loss_from_hidden(hidden: jax.Array, head_fn, embedding: jax.Array, targets: jax.Array,
                             weights: jax.Array, teacher: SparseTeacher | None = None, *, kind: str,
                             alpha: float = 0.0, temperature: float = 1.0, beta: float = 0.5,
                             vocab_chunk: int = 16384, ce_weights: jax.Array | None = None,
                             remat: bool | None = None, rest: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`distill_loss` on the logits head_fn(hidden, embedding) without building them: hidden [B, T, d] final
    states, `head_fn(hidden, rows)` the logits of vocabulary rows [V', d] (e.g. `model.head`), embedding [V, d].
    Peak memory is [B, T, vocab_chunk] with `remat` (recompute each chunk for the gradient), [B, T, V] without;
    None chooses by REMAT_ABOVE_BYTES. The teacher must be sparse (or None for kind "ce"). `ce_weights`, when
    given, replace `weights` for the CE term (on-policy rows: 0). `rest` as in `distill_loss`."""
    _check(kind, alpha, temperature, beta, teacher, rest)
    if teacher is not None and not isinstance(teacher, SparseTeacher):
        raise ValueError("the chunked loss takes a SparseTeacher; use distill_loss for full teacher logits")
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be positive, got {vocab_chunk}")
    ids = None if kind == "ce" else teacher.ids
    lse, lse_tau, at_target, at_ids, best = _chunked_student(hidden, head_fn, embedding, targets, ids,
                                                                temperature=temperature, vocab_chunk=vocab_chunk,
                                                                remat=remat)
    ce = lse - at_target
    if kind == "ce":
        return _combine(ce, None, None, weights, kind=kind, alpha=alpha, temperature=temperature)
    kd = _sparse_kd(at_ids, lse_tau, teacher, kind=kind, temperature=temperature, beta=beta, rest=rest)
    top = jnp.argmax(teacher.logprobs, axis=-1)[..., None]  # the teacher's top id, among its k
    agree = jax.lax.stop_gradient(jnp.take_along_axis(at_ids, top, axis=-1)[..., 0]) >= best
    return _combine(ce, kd, agree, weights, kind=kind, alpha=alpha, temperature=temperature, ce_weights=ce_weights)
