"""Teacher modes. Each fills a batch with the teacher's sparse distribution (`teacher_ids`, `teacher_logprobs`,
[accum, batch, seq, k]) before the train step, so the step itself is the same for every mode.

Online: the teacher's forward runs in its own jitted call each step (its parameters are an argument, never a
constant baked into the program).
"""

from __future__ import annotations

import jax
from flax import nnx

from distill.losses import SparseTeacher, distill_loss_from_hidden, sparse_from_logits
from nano.model import Decoder


class OnlineTeacher:
    def __init__(self, teacher: Decoder, *, k: int = 256, mode: str = "sample", seed: int = 0):
        graphdef, self.state = nnx.split(teacher)
        self.key = jax.random.PRNGKey(seed)

        def score(state, batch, key):
            logits, _ = nnx.merge(graphdef, state)(batch["tokens"], batch["positions"],
                                                   segment_ids=batch["segment_ids"])
            sparse = sparse_from_logits(logits, k, mode=mode, key=key)
            return sparse.ids, sparse.logprobs

        self._score = jax.jit(jax.vmap(score, in_axes=(None, 0, 0)))  # over the accumulation axis

    def __call__(self, batch: dict, step: int) -> dict:
        accum = batch["tokens"].shape[0]
        keys = jax.random.split(jax.random.fold_in(self.key, step), accum)  # a function of the step: resumable
        ids, logprobs = self._score(self.state, batch, keys)
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}


def make_loss(*, kind: str, alpha: float = 0.0, temperature: float = 1.0, beta: float = 0.5,
              vocab_chunk: int = 16384):
    """loss_fn(model, batch, rng) for the train step: the vocabulary-chunked distillation loss."""

    def loss_fn(model: Decoder, batch: dict, rng):
        hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"],
                          return_hidden=True)
        teacher = None if kind == "ce" else SparseTeacher(ids=batch["teacher_ids"],
                                                          logprobs=batch["teacher_logprobs"])
        return distill_loss_from_hidden(hidden, model.head, model.embedder.embedding[...], batch["targets"],
                                        batch["weights"], teacher, kind=kind, alpha=alpha,
                                        temperature=temperature, beta=beta, vocab_chunk=vocab_chunk,
                                        ce_weights=batch.get("ce_weights"))

    return loss_fn
