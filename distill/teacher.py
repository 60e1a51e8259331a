"""Teacher modes. Each fills a batch with the teacher's sparse distribution (`teacher_ids`, `teacher_logprobs`,
[accum, batch, seq, k]) before the train step, so the step itself is the same for every mode.

Online: the teacher's forward runs in its own jitted call each step (its parameters are an argument, never a
constant baked into the program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distill.losses import SparseTeacher, distill_loss_from_hidden, sparse_from_hidden
from distill.sharding import model_shardings, replicated, step_batch_sharding, to_global
from nano.config import ModelConfig
from nano.model import Decoder, abstract_model
from nano.tokenizer import TrimmedVocab


def random_teacher(config: ModelConfig, *, dtype, mesh: Mesh, seed: int = 0) -> Decoder:
    """A teacher architecture with random weights, created in `dtype` and already sharded on `mesh`: no device
    ever holds more than its shard. For throughput runs of teachers whose checkpoint you do not have."""
    graphdef, abstract = nnx.split(abstract_model(config, dtype=dtype))

    def create(key):
        state = nnx.state(Decoder(config, rngs=nnx.Rngs(key), dtype=dtype))
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)

    state = jax.jit(create, out_shardings=model_shardings(abstract, mesh))(jax.random.PRNGKey(seed))
    return nnx.merge(graphdef, state)


class OnlineTeacher:
    def __init__(self, teacher: Decoder, *, k: int = 256, mode: str = "sample", seed: int = 0, mesh: Mesh | None = None,
                 vocab_chunk: int = 16384, vocab: TrimmedVocab | None = None):
        """With a `mesh`, the teacher's weights are sharded by the partition rules like the student's, and each
        device scores its own share of the batch. The vocabulary is walked in `vocab_chunk` rows: the teacher's
        [batch, seq, vocab] logits never exist.

        `vocab` is for a student with a trimmed vocabulary: the teacher reads the batch's student tokens as its own
        ids, and its distribution becomes one over the student's next piece, from which the k ids are drawn, as
        student ids (see distill.losses.sparse_from_logits)."""
        graphdef, self.state = nnx.split(teacher)
        self.key = jax.random.PRNGKey(seed)
        to_teacher = None if vocab is None else jnp.asarray(vocab.teacher_ids, jnp.int32)
        id_map = None if vocab is None else vocab.first_pieces

        def score(state, batch, key):
            model = nnx.merge(graphdef, state)
            tokens = batch["tokens"] if to_teacher is None else jnp.take(to_teacher, batch["tokens"])
            hidden, _ = model(tokens, batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
            sparse = sparse_from_hidden(hidden, model.head, model.embedder.embedding.get_value(), k, mode=mode,
                                        key=key, vocab_chunk=vocab_chunk, id_map=id_map)
            return sparse.ids, sparse.logprobs

        score = jax.vmap(score, in_axes=(None, 0, 0))  # over the accumulation axis
        self.rows = None
        if mesh is None:
            self._score = jax.jit(score)
            return
        shardings = model_shardings(self.state, mesh)
        self.state = jax.device_put(self.state, shardings)
        self.rows = step_batch_sharding(mesh)
        self._score = jax.jit(score, in_shardings=(shardings, self.rows, replicated(mesh)),
                              out_shardings=(self.rows, self.rows))

    def __call__(self, batch: dict, step: int) -> dict:
        accum = batch["tokens"].shape[0]
        keys = jax.random.split(jax.random.fold_in(self.key, step), accum)  # a function of the step: resumable
        text = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
        if self.rows is not None:  # laid out on the mesh, which may span processes
            text, keys = to_global(text, self.rows), to_global(np.asarray(keys), replicated(self.rows.mesh))
        ids, logprobs = self._score(self.state, text, keys)
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}


def make_loss(*, kind: str, alpha: float = 0.0, temperature: float = 1.0, beta: float = 0.5,
              vocab_chunk: int = 16384, rest: bool = False):
    """loss_fn(model, batch, rng) for the train step: the vocabulary-chunked distillation loss (`rest`: the
    teacher's other tokens as one more outcome instead of renormalising over its k; see distill.losses)."""

    def loss_fn(model: Decoder, batch: dict, rng):
        hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"],
                          return_hidden=True)
        teacher = None if kind == "ce" else SparseTeacher(ids=batch["teacher_ids"],
                                                          logprobs=batch["teacher_logprobs"])
        return distill_loss_from_hidden(hidden, model.head, model.embedder.embedding[...], batch["targets"],
                                        batch["weights"], teacher, kind=kind, alpha=alpha,
                                        temperature=temperature, beta=beta, vocab_chunk=vocab_chunk,
                                        ce_weights=batch.get("ce_weights"), rest=rest)

    return loss_fn
