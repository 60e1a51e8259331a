"""The artifact's signatures: the one decoder with fixed shapes, in the names the LiteRT-LM engine binds.

    prefill_<N>(tokens [1, N] int32, input_pos [N] int32, kv_cache_k_<i>, kv_cache_v_<i>) -> the caches
    decode(tokens [1, 1] int32, input_pos [1] int32, kv_cache_k_<i>, kv_cache_v_<i>) -> logits [1, 1, V], the caches

Every cache is [1, kv_heads, slots, head_dim] float32 and comes back whole under its input's name (the engine
updates it in place). A global layer has `max_tokens` slots; a local (sliding-window) layer has a ring of
`sliding_window` slots, since it never looks further back. Prefill returns no logits: the engine feeds the prompt's
last token through decode, so a prefill never needs the vocabulary-sized head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import export as jax_export

from nano.config import ModelConfig
from nano.layers import export_lookups
from nano.model import Decoder, KVCache

TOKENS, INPUT_POS, LOGITS = "tokens", "input_pos", "logits"
K_CACHE, V_CACHE = "kv_cache_k_", "kv_cache_v_"
DECODE = "decode"


def prefill_name(length: int) -> str:
    return f"prefill_{length}"


def cache_names(config: ModelConfig) -> list[str]:
    return [f"{K_CACHE}{i}" for i in range(config.num_layers)] + [f"{V_CACHE}{i}" for i in range(config.num_layers)]


def cache_shapes(config: ModelConfig, max_tokens: int) -> dict[str, tuple[int, ...]]:
    """Each cache input's shape, in `cache_names` order."""
    cache = jax.eval_shape(lambda: KVCache.zeros(config, 1, max_tokens))
    return dict(zip(cache_names(config), [x.shape for x in (*cache.k, *cache.v)]))


@dataclasses.dataclass
class Signature:
    name: str
    exported: jax_export.Exported
    inputs: list[str]
    outputs: list[str]


def _signature_fn(model: Decoder, *, logits: bool):
    n = model.config.num_layers

    def fn(tokens, input_pos, *caches):
        cache = KVCache(k=tuple(caches[:n]), v=tuple(caches[n:]))
        hidden, cache = model(tokens, input_pos[None], cache=cache, return_hidden=True)
        out = dict(zip(cache_names(model.config), (*cache.k, *cache.v)))
        if logits:
            out[LOGITS] = model.head(hidden)
        return out

    return fn


def export_signature(model: Decoder, length: int, max_tokens: int) -> Signature:
    """One signature as StableHLO: `decode` for length 1 (with logits), `prefill_<length>` otherwise. The model's
    weights become the program's constants."""
    config = model.config
    name = DECODE if length == 1 else prefill_name(length)
    shapes = cache_shapes(config, max_tokens)
    args = [jax.ShapeDtypeStruct((1, length), jnp.int32), jax.ShapeDtypeStruct((length,), jnp.int32)]
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes.values()]
    with export_lookups():
        exported = jax_export.export(jax.jit(_signature_fn(model, logits=name == DECODE)))(*args)
    # A dict's outputs come out in its pytree order (sorted keys); name them in that order.
    names = jax.tree_util.tree_unflatten(exported.out_tree, range(exported.out_tree.num_leaves))
    outputs = [None] * exported.out_tree.num_leaves
    for key, index in names.items():
        outputs[index] = key
    return Signature(name, exported, [TOKENS, INPUT_POS, *shapes], outputs)
