"""On-policy batches (GKD, Agarwal et al. 2024; Gemma 2 post-training): on a fraction of optimizer steps the
student trains on sequences it sampled itself, so the teacher corrects it where it actually goes at inference
time instead of only on the data's prefixes (the train/inference mismatch of plain distillation).

    on_policy = OnPolicy(graphdef, config, fraction=0.5, seed=0)
    batch = on_policy(batch, step, state.params)   # before teacher(batch, step), which then scores the samples

Contract. Batches are dicts of numpy arrays [accum, batch, seq] (`tokens, targets, positions, segment_ids,
weights`, see distill.data). On an on-policy step every row is replaced: its first P = max(1, round(
prompt_fraction * S)) tokens are a prompt the student continues to S + 1 tokens; `weights` are 1 exactly on the
targets the student generated, up to and including its first EOS; a new key `ce_weights` (zeros) tells the loss
to skip cross-entropy there (the student's own samples are no ground truth: those steps train on the divergence
only). Off-policy steps return the batch unchanged (no `ce_weights`: the loss uses `weights` then). Which steps
and which samples are functions of (seed, step) alone, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.config import ModelConfig
from nano.kv_cache import KVCache
from nano.sampling import SamplingConfig, sample_logits

_SAMPLE_STREAM = 0x6F6E  # separates the sampling keys from the teacher's, which also fold the step into `seed`


class OnPolicy:
    def __init__(self, graphdef, config: ModelConfig, *, fraction: float, seed: int = 0,
                 prompt_fraction: float = 0.5, temperature: float = 1.0, eos_id: int = 1):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not 0.0 <= prompt_fraction <= 1.0:
            raise ValueError(f"prompt_fraction must be in [0, 1], got {prompt_fraction}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.config, self.fraction, self.seed = config, fraction, seed
        self.prompt_fraction, self.eos_id = prompt_fraction, eos_id
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLE_STREAM)
        sampling = SamplingConfig(temperature=temperature)

        def generate(params, prompt, key, length: int):
            """prompt [N, P] → sequences [N, length]: prefill once, then decode one token per loop step."""
            model = nnx.merge(graphdef, params)  # params are an argument: one compile serves every step
            n, p = prompt.shape
            cache = KVCache.zeros(config, n, length, dtype=jnp.float32)
            positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
            logits, cache = model(prompt, positions, cache=cache)
            seq = jnp.zeros((n, length), jnp.int32).at[:, :p].set(prompt)
            seq = seq.at[:, p].set(sample_logits(logits[:, -1], jax.random.fold_in(key, p), sampling))

            def body(pos, carry):  # feed seq[:, pos] at position pos, sample seq[:, pos + 1]
                seq, cache = carry
                token = jax.lax.dynamic_slice_in_dim(seq, pos, 1, axis=1)
                logits, cache = model(token, jnp.full((n, 1), pos, jnp.int32), cache=cache)
                new = sample_logits(logits[:, -1], jax.random.fold_in(key, pos + 1), sampling)
                return jax.lax.dynamic_update_slice_in_dim(seq, new[:, None], pos + 1, axis=1), cache

            seq, _ = jax.lax.fori_loop(p, length - 1, body, (seq, cache))
            return seq

        self._generate = jax.jit(generate, static_argnames=("length",))

    def is_on_policy(self, step: int) -> bool:
        # A hash of (seed, step), not `step % n`: the on-policy steps spread over the run without a fixed rhythm
        # that could alias with accumulation, evaluation or checkpoint periods, and a resumed run picks the same.
        return bool(np.random.default_rng([self.seed, int(step)]).random() < self.fraction)

    def prompt_length(self, seq_len: int) -> int:
        return min(seq_len, max(1, round(self.prompt_fraction * seq_len)))  # at least one generated token

    def __call__(self, batch: dict, step: int, params) -> dict:
        if not self.is_on_policy(step):
            return batch
        tokens = batch["tokens"]
        accum, rows, s = tokens.shape
        p = self.prompt_length(s)
        # The prompt is the row's first P tokens read as ONE sequence at positions 0..P-1: document boundaries
        # (segment_ids / restarting positions) inside it are ignored; the student simply continues that text.
        prompt = jnp.asarray(np.asarray(tokens[:, :, :p]).reshape(accum * rows, p), jnp.int32)
        seq = np.asarray(self._generate(params, prompt, jax.random.fold_in(self.key, step), length=s + 1))
        seq = seq.reshape(accum, rows, s + 1)

        # Target t is seq[t + 1]: generated when t >= P - 1. Generation runs on after an EOS (fixed shapes), so
        # targets after the first generated EOS are masked; the EOS target itself is kept (ending is a choice).
        t = np.arange(s)
        generated = t >= p - 1
        eos = (seq[:, :, 1:] == self.eos_id) & generated
        eos_before = np.cumsum(eos, axis=-1) - eos  # generated EOS strictly before target t
        weights = generated & (eos_before == 0)

        wdtype = batch["weights"].dtype
        out = {k: v for k, v in batch.items() if not k.startswith("teacher_")}  # stale if present: rescored
        out.update(
            tokens=seq[:, :, :s].astype(tokens.dtype),
            targets=seq[:, :, 1:].astype(batch["targets"].dtype),
            positions=np.broadcast_to(t, tokens.shape).astype(batch["positions"].dtype),
            segment_ids=np.ones(tokens.shape, batch["segment_ids"].dtype),
            weights=weights.astype(wdtype),
            ce_weights=np.zeros(tokens.shape, wdtype),
        )
        return out
