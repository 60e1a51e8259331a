"""Scoring a model on fixed batches, optionally against a reference model: distillation's held-out evaluation
(student vs teacher), quantization's report (quantized vs float) and `nano perplexity` (windows of a text).

    evaluate = Evaluator(datasets.heldout_batches(), teacher_model=teacher)
    result = evaluate(student)   # {"heldout_ppl", "heldout_nll", "heldout_tokens", "teacher_student_top1", ...}

A batch is a dict of [B, S] arrays under BATCH_KEYS: the model reads `tokens` at `positions` (restarting at each
document, kept apart by `segment_ids`), and is scored on predicting `targets` with `weights` (0 on padding).

Every quantity is a weighted sum over the held-out target positions (weight 0 on padding and document ends),
summed in float64 on the host and divided at the end, so the result does not depend on how rows are batched.

The teacher's logits are never kept: for a 262k vocabulary one [8, 128] batch of float32 logits is 1 GiB. The
teacher runs inside the same jitted call as the student, and the call walks the batch in row chunks
(`jax.lax.map`) small enough that both models' logits for a chunk fit `max_chunk_elements`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.errors import NanoError
from nano.scoring import bits_per_byte, fold_to_student, kl_from_logits, nll
from nano.tokenizer import TrimmedVocab

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "weights")


def _chunk_sums(student_graph, teacher_graph, student_state, teacher_state, vocab, chunk):
    """[nll_sum, weight_sum, agree_sum, kl_sum] over one chunk of rows (float32; the host accumulates)."""
    def logits_of(graph, state, tokens):
        model = nnx.merge(graph, state)
        hidden, _ = model(tokens, chunk["positions"], segment_ids=chunk["segment_ids"], return_hidden=True)
        return model.head(hidden).astype(jnp.float32)

    w = chunk["weights"].astype(jnp.float32)
    live = w > 0  # masking, not just multiplying: a NaN or inf at a padding position must not leak into a sum
    logits = logits_of(student_graph, student_state, chunk["tokens"])
    sums = [jnp.sum(jnp.where(live, w * nll(logits, chunk["targets"]), 0.0)), jnp.sum(w)]
    if teacher_graph is None:
        return jnp.stack(sums + [jnp.zeros(()), jnp.zeros(())])
    if vocab is None:
        teacher = logits_of(teacher_graph, teacher_state, chunk["tokens"])
    else:  # the teacher reads the student's tokens as its ids; its distribution over the student's next piece
        teacher_ids, first_pieces = vocab
        teacher = fold_to_student(logits_of(teacher_graph, teacher_state, jnp.take(teacher_ids, chunk["tokens"])),
                                  first_pieces, size=logits.shape[-1])
    kl = kl_from_logits(teacher, logits)
    # Top-1 agreement as "the maxima share a position", which needs no argmax (a slow variadic reduction on
    # XLA:CPU).
    at_max = (logits == jnp.max(logits, axis=-1, keepdims=True)) & (teacher == jnp.max(teacher, axis=-1, keepdims=True))
    agree = jnp.any(at_max, axis=-1).astype(jnp.float32)
    return jnp.stack(sums + [jnp.sum(jnp.where(live, w * agree, 0.0)), jnp.sum(jnp.where(live, w * kl, 0.0))])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_sums(student_graph, teacher_graph, rows, student_state, teacher_state, vocab, batch):
    """Sums over a [B, S] batch, `rows` rows at a time. Graphdefs and the chunk size are static (one program per
    model structure and batch shape); the parameter states are arguments, so a new checkpoint never recompiles."""
    chunks = {k: v.reshape(v.shape[0] // rows, rows, *v.shape[1:]) for k, v in batch.items()}
    per_chunk = jax.lax.map(
        lambda c: _chunk_sums(student_graph, teacher_graph, student_state, teacher_state, vocab, c), chunks)
    return jnp.sum(per_chunk, axis=0)


def _rows_per_chunk(batch_rows: int, seq_len: int, vocab: int, max_elements: int) -> int:
    """The largest divisor of batch_rows whose [rows, seq_len, vocab] logits stay within max_elements (at least 1)."""
    fits = [r for r in range(1, batch_rows + 1) if batch_rows % r == 0 and r * seq_len * vocab <= max_elements]
    return max(fits, default=1)


class Evaluator:
    """Scores students on a fixed held-out set; see the module docstring.

    `max_chunk_elements` bounds the logits of one model per lax.map step (2**28 float32 = 1 GiB: chunks of a few
    rows keep the teacher's matmuls efficient on a CPU, where one-row chunks halved its speed)."""

    def __init__(self, heldout_batches: list[dict], *, teacher_model=None, token_bytes: np.ndarray | None = None,
                 vocab: TrimmedVocab | None = None, max_chunk_elements: int = 2 ** 28):
        """`token_bytes` (the UTF-8 bytes each vocabulary id decodes to, `Tokenizer.token_bytes`) adds bits per
        byte: the NLL over the bytes of the scored targets. `vocab` (a trimmed-vocabulary student's) lets the
        teacher read the student's tokens, and compares the student with the teacher's distribution over the
        student's next piece (`nano.scoring.fold_to_student`)."""
        if not heldout_batches:
            raise NanoError("no held-out batches to evaluate on (is the held-out split empty?)")
        self.scored_bytes = None if token_bytes is None else int(sum(
            np.sum(np.asarray(b["weights"]) * np.asarray(token_bytes)[np.asarray(b["targets"])])
            for b in heldout_batches))
        self.batches = [{k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in heldout_batches]  # on device once
        if teacher_model is None:
            self._teacher_graph, self._teacher_state, self._teacher_vocab = None, None, 0
        else:
            self._teacher_graph, self._teacher_state = nnx.split(teacher_model)
            self._teacher_vocab = teacher_model.config.vocab_size
        self._vocab = None if vocab is None else (jnp.asarray(vocab.teacher_ids, jnp.int32),
                                                  jnp.asarray(vocab.first_pieces, jnp.int32))
        self.max_chunk_elements = max_chunk_elements

    def __call__(self, student_model, *, progress: Callable[[int, int], None] | None = None) -> dict:
        """The scores of `student_model`; `progress(done, total)` hears each batch."""
        graph, state = nnx.split(student_model)
        vocab = max(student_model.config.vocab_size, self._teacher_vocab)
        totals = np.zeros(4, np.float64)
        for done, batch in enumerate(self.batches, start=1):
            rows = _rows_per_chunk(*batch["tokens"].shape, vocab, self.max_chunk_elements)
            sums = _batch_sums(graph, self._teacher_graph, rows, state, self._teacher_state, self._vocab, batch)
            totals += np.asarray(jax.device_get(sums), np.float64)
            if progress:
                progress(done, len(self.batches))
        nll_sum, weight_sum, agree_sum, kl_sum = totals
        if weight_sum <= 0:
            raise NanoError("the held-out batches have no scored tokens (every weight is 0)")
        nll = float(nll_sum / weight_sum)
        result = {"heldout_ppl": math.exp(nll), "heldout_nll": nll, "heldout_tokens": int(round(weight_sum))}
        if self.scored_bytes:
            result["bits_per_byte"] = bits_per_byte(nll_sum, self.scored_bytes)
        if self._teacher_graph is not None:
            result["teacher_student_top1"] = float(agree_sum / weight_sum)
            result["kl_teacher_student"] = float(kl_sum / weight_sum)
        return result
