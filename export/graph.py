"""The artifact's signatures: the one decoder with fixed shapes, in the names the LiteRT-LM engine binds.

    prefill_<N>(tokens [1, N] int32, input_pos [N] int32, kv_cache_k_<i>, kv_cache_v_<i>) -> the caches
    decode(tokens [1, 1] int32, input_pos [1] int32, kv_cache_k_<i>, kv_cache_v_<i>) -> logits [1, 1, V], the caches

Every cache is [1, kv_heads, slots, head_dim] float32 and comes back whole under its input's name (the engine
updates it in place). A global layer has `max_tokens` slots; a local (sliding-window) layer has a ring of
`sliding_window` slots, since it never looks further back. Prefill returns no logits: the engine feeds the prompt's
last token through decode, so a prefill never needs the vocabulary-sized head.

The weights are exported as leading arguments, not captured as constants: JAX then never serializes them (its
StableHLO is a few MB whatever the model's size), the converter converts a graph without them (export.convert), and
export.weights writes each one into the file as the constant the kernels read. The model exported here may be
abstract (shapes only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import export as jax_export

from flax import nnx

from nano.config import ModelConfig
from nano.layers import export_lookups
from nano.model import Decoder, KVCache
from nano.quant import QuantizedWeight

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
    weights: list[str]  # the parameters the program takes (leading arguments), by name


def weight_leaves(model: Decoder) -> list[tuple[str, object]]:
    """(name, value) of the model's parameters in the order the exported programs take them. A quantized weight
    is one leaf: the program takes it dequantized, float32."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return [(".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)), leaf) for path, leaf in flat]


def transposed(name: str) -> bool:
    """A projection kernel [in, out] is passed as [out, in], the layout of TFLite's FULLY_CONNECTED weights: the
    converter then finds each weight in its own layout and makes no transposed copy of it."""
    return name.endswith(".kernel")


def _signature_fn(model: Decoder, *, logits: bool):
    n = model.config.num_layers
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    treedef = jax.tree_util.tree_structure(params)
    flip = [transposed(name) for name, _ in weight_leaves(model)]

    def fn(weights, tokens, input_pos, *caches):
        weights = [w.T if f else w for w, f in zip(weights, flip)]
        net = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, weights), rest)
        cache = KVCache(k=tuple(caches[:n]), v=tuple(caches[n:]))
        hidden, cache = net(tokens, input_pos[None], cache=cache, return_hidden=True)
        out = dict(zip(cache_names(model.config), (*cache.k, *cache.v)))
        if logits:
            out[LOGITS] = net.head(hidden)
        return out

    return fn


def export_signature(model: Decoder, length: int, max_tokens: int) -> Signature:
    """One signature as StableHLO: `decode` for length 1 (with logits), `prefill_<length>` otherwise."""
    config = model.config
    name = DECODE if length == 1 else prefill_name(length)
    shapes = cache_shapes(config, max_tokens)
    weights = [jax.ShapeDtypeStruct(w.shape[::-1] if transposed(param) else w.shape, jnp.float32)
               for param, w in weight_leaves(model)]
    args = [jax.ShapeDtypeStruct((1, length), jnp.int32), jax.ShapeDtypeStruct((length,), jnp.int32)]
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes.values()]
    with export_lookups():
        exported = jax_export.export(jax.jit(_signature_fn(model, logits=name == DECODE)))(weights, *args)
    # JAX drops arguments a program does not use (a prefill never reaches the last layer's MLP or the head).
    names = [param for param, _ in weight_leaves(model)]
    kept = [names[i] for i in exported.module_kept_var_idx if i < len(weights)]
    if len(exported.module_kept_var_idx) - len(kept) != len(args):
        raise RuntimeError(f"{name}: the exported program dropped a token or cache input")
    # A dict's outputs come out in its pytree order (sorted keys); name them in that order.
    positions = jax.tree_util.tree_unflatten(exported.out_tree, range(exported.out_tree.num_leaves))
    outputs = [None] * exported.out_tree.num_leaves
    for key, index in positions.items():
        outputs[index] = key
    return Signature(name, exported, [TOKENS, INPUT_POS, *shapes], outputs, kept)
