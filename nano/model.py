"""One Gemma-3-family decoder for every stage: training, distillation, evaluation, sampling and export.

    logits, cache = model(tokens, positions, segment_ids=..., cache=...)

Without a cache the call scores a full (possibly packed) sequence; with a cache it writes the chunk's keys and
values at `positions` and attends over the cache, so prefill and token-by-token decoding are the same call.
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from nano.config import GLOBAL, ModelConfig
from nano.kv_cache import SLOT_AXIS, KVCache, cached_keys
from nano.layers import Embedder, Linear, RMSNorm, apply_rope, as_array, device_arithmetic, integer_input
from nano.rotation import rotate_last

_MASKED = -1e30  # a finite "minus infinity": a fully masked row cannot produce NaN


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, window: int | None, causal_by_index: bool,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
    """Boolean [B, T, S]: which key each query may see.

    Causality compares indices within one full sequence (packed documents restart their positions), and cache
    slots by position. The sliding window always compares positions.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    if causal_by_index:
        t, s = q_pos.shape[1], k_pos.shape[1]
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
    else:
        mask = kp <= qp
    if window is not None:
        mask = mask & (qp - kp < window)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.query_scale = c.query_scale
        self.is_global = layer_type == GLOBAL
        self.window = None if self.is_global else c.sliding_window
        self.rope_base = c.rope_base_global if self.is_global else c.rope_base_local
        self.rope_scale = c.rope_scale_global if self.is_global else 1.0
        self.q_proj = Linear(c.d_model, c.num_heads * c.head_dim, rngs=rngs)
        self.k_proj = Linear(c.d_model, c.num_kv_heads * c.head_dim, rngs=rngs)
        self.v_proj = Linear(c.d_model, c.num_kv_heads * c.head_dim, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.d_model, rngs=rngs)
        self.q_norm = RMSNorm(c.head_dim, eps=c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, eps=c.norm_eps)

    def __call__(self, x, positions, segment_ids=None, kv=None, attention_bias=None):
        b, t, _ = x.shape
        kvh, g, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, hd))  # [B, T, H, hd]
        k = self.k_norm(self.k_proj(x).reshape(b, t, kvh, hd))  # [B, T, KVH, hd]
        v = self.v_proj(x).reshape(b, t, kvh, hd)
        q = apply_rope(q, positions, base=self.rope_base, scale=self.rope_scale) * jnp.asarray(self.query_scale, x.dtype)
        k = apply_rope(k, positions, base=self.rope_base, scale=self.rope_scale)
        k, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, KVH, T, hd], [B, KVH, hd, T]

        if kv is None:
            keys, values = k, vt
            mask = attention_mask(positions, positions, window=self.window, causal_by_index=True,
                                  q_seg=segment_ids, k_seg=segment_ids)
        else:
            # A local layer's cache is a ring once it is window-long; shorter, it holds the whole context.
            ring = self.window is not None and kv[1].shape[SLOT_AXIS["v"]] >= self.window
            keys, values, key_pos, key_ok, new_kv = cached_keys(kv, k, vt, positions, ring=ring)
            mask = attention_mask(positions, key_pos, window=self.window, causal_by_index=False)
            mask = mask & key_ok[:, None, :]

        # Plain batched matmuls over [B, KVH, G*T, hd]: the query heads sharing a KV head are stacked with time,
        # which exports to batch-matmul without broadcasting the keys (faster than an einsum over groups).
        qg = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
        scores = jnp.matmul(qg, jnp.swapaxes(keys.astype(x.dtype), -1, -2), preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kvh, g, t, -1)
        # The mask as an additive bias [B, T, S], the same for every layer of a kind, so the export computes it once:
        # a select per layer would be a TFLite reference op, single-threaded and between two XNNPACK partitions.
        bias = jnp.where(mask, 0.0, _MASKED)
        if attention_bias is not None and self.is_global and kv is not None:
            bias = bias + attention_bias[:, 0]  # the engine's mask [B, 1, T, S] over the cache's slots
        scores = scores + bias.astype(scores.dtype)[:, None, None]
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(b, kvh, g * t, -1)
        out = jnp.matmul(probs, jnp.swapaxes(values.astype(x.dtype), -1, -2),
                         preferred_element_type=jnp.float32).astype(x.dtype)
        out = out.reshape(b, kvh, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * hd)
        return self.o_proj(out), (None if kv is None else new_kv)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.gate = Linear(config.d_model, config.ffn_dim, rngs=rngs)
        self.up = Linear(config.d_model, config.ffn_dim, rngs=rngs)
        self.down = Linear(config.ffn_dim, config.d_model, rngs=rngs)
        self.rotation = config.ffn_rotation

    def __call__(self, x):
        h = jax.nn.gelu(self.gate(x), approximate=True) * self.up(x)
        if self.rotation:  # the down kernel is stored rotated to match (nano.rotation)
            h = rotate_last(h, self.rotation)
        return self.down(h)


class Block(nnx.Module):
    """Pre- and post-norm around both attention and MLP, as in Gemma 2 and 3."""

    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        eps = config.norm_eps
        self.attn_norm = RMSNorm(config.d_model, eps=eps)
        self.attn = Attention(config, layer_type, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.d_model, eps=eps)
        self.mlp_norm = RMSNorm(config.d_model, eps=eps)
        self.mlp = MLP(config, rngs=rngs)
        self.post_mlp_norm = RMSNorm(config.d_model, eps=eps)
        self.rotation = config.input_rotation

    def _normed(self, norm, x):
        """A branch's input: normed, and rotated where its kernels are stored rotated to match (nano.rotation)."""
        h = norm(x)
        return rotate_last(h, self.rotation) if self.rotation else h

    def __call__(self, x, positions, segment_ids=None, kv=None, attention_bias=None):
        h, kv = self.attn(self._normed(self.attn_norm, x), positions, segment_ids, kv, attention_bias)
        x = x + self.post_attn_norm(h)
        x = x + self.post_mlp_norm(self.mlp(self._normed(self.mlp_norm, x)))
        return x, kv


# Rematerialisation: what a training step keeps of each block for the backward pass. "none" keeps everything;
# "dots" keeps the matmul outputs and recomputes the cheap elementwise work; "block" keeps only each block's input
# and recomputes the block (activations then grow with layers × d_model instead of with ffn and attention).
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "block": jax.checkpoint_policies.nothing_saveable}


class Decoder(nnx.Module):
    """The Gemma 3 decoder. `dtype` is the compute dtype (float32 or bfloat16); parameters are cast to it at use."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.remat = "none"  # training sets a REMAT_POLICIES name: what the backward pass recomputes
        # True: integer layers compute as the LiteRT artifact does on a CPU (XNNPACK rounds their inputs to int8
        # per row at run time), so this model predicts the artifact's numbers; False: exact float activations.
        self.as_device = False
        self.embedder = Embedder(config.vocab_size, config.d_model, rngs=rngs)
        self.layers = nnx.List([Block(config, t, rngs=rngs) for t in config.layer_types])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None, return_hidden: bool = False,
                 attention_bias: jax.Array | None = None):
        """tokens [B, T] int → (logits [B, T, vocab] float32, updated cache or None).

        positions [B, T] default to 0..T-1 and are required with a cache. segment_ids [B, T] keep packed
        documents from attending to each other (full sequences only). `return_hidden` returns the final-normed
        hidden states [B, T, d_model] instead of logits, for losses that apply `head` in vocabulary chunks.
        `attention_bias` [B, 1, T, S] (with a cache) is added to the global layers' scores over the cache's S slots:
        the LiteRT-LM engine's `mask` input (0 where a key may be seen, a large negative number where not), which
        the export takes so that the engine finds the context in it; the model's own mask decides the same.
        """
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when decoding with a cache")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids apply to full sequences, not cached decoding")
        with device_arithmetic(self.as_device):
            hidden, new_cache = self._layers(tokens, positions, segment_ids, cache, attention_bias)
        return (hidden if return_hidden else self.head(hidden)), new_cache

    def _layers(self, tokens, positions, segment_ids, cache, attention_bias):
        """The final-normed hidden states [B, T, d_model] and the updated cache (or None)."""
        x = self.embedder.encode(tokens, self.dtype)
        new_k, new_v = [], []
        policy = REMAT_POLICIES[self.remat]
        for i, layer in enumerate(self.layers):
            if policy is not None and cache is None:
                x, kv = nnx.remat(lambda block, x: block(x, positions, segment_ids), policy=policy)(layer, x)
                continue
            x, kv = layer(x, positions, segment_ids, None if cache is None else (cache.k[i], cache.v[i]),
                          attention_bias)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return self.final_norm(x), None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))

    def head(self, hidden: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
        """Logits (float32) from final hidden states through the tied embedding, softcapped if configured.

        `embedding` may be a slice of vocabulary rows [V', d_model], giving the logits of those tokens only.
        """
        w = self.embedder.embedding.get_value() if embedding is None else embedding
        with device_arithmetic(self.as_device):
            hidden = integer_input(hidden, w)
        logits = jnp.matmul(hidden, as_array(w, hidden.dtype).T, preferred_element_type=jnp.float32)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits


def init_model(config: ModelConfig, *, seed: int = 0, dtype=jnp.float32) -> Decoder:
    return Decoder(config, rngs=nnx.Rngs(seed), dtype=dtype)


def init_param_parts(config: ModelConfig, *, seed: int = 0) -> Iterator[dict[str, jax.Array]]:
    """`init_model(config, seed=seed)`'s parameters ({dotted name: array}), one part at a time: the embedding, each
    layer, the final norm. Each part is its own jitted program, from which XLA drops every other parameter's
    initialisation, so one part is allocated at a time: a model larger than memory can be made and consumed."""
    prefixes = ["embedder.", *(f"layers.{i}." for i in range(config.num_layers)), "final_norm."]
    for prefix in prefixes:
        def create(prefix=prefix):
            state = nnx.state(Decoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
            named = ((".".join(map(str, path)), var.get_value()) for path, var in nnx.to_flat_state(state))
            return {name: value for name, value in named if name.startswith(prefix)}

        yield jax.jit(create)()


def abstract_model(config: ModelConfig, *, dtype=jnp.float32) -> Decoder:
    """The model with ShapeDtypeStructs for parameters: shapes and counts without allocating."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype))


def count_params(model: Decoder) -> int:
    """Weights counted once each, float or quantized (a quantized weight's scales are not extra parameters)."""
    return sum(math.prod(var.get_value().shape) for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)))
