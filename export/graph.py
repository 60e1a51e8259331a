"""The artifact's signatures: the one decoder with fixed shapes, in the names the LiteRT-LM engine binds.

    prefill_<N>(tokens [1, N] int32, input_pos [N] int32, mask [1, 1, N, S], kv_cache_k_<i>, kv_cache_v_<i>)
        -> the caches
    decode(tokens [1, 1] int32, input_pos [1] int32, mask [1, 1, 1, S], kv_cache_k_<i>, kv_cache_v_<i>)
        -> logits [1, 1, V], the caches

Every cache comes back whole under its input's name (the engine updates it in place): keys [kv_heads, slots,
head_dim], values transposed [kv_heads, head_dim, slots], without the kv_heads axis when there is one
(nano.kv_cache.KVCache): each attention matmul then reads its cache buffer as it is, where a reshape of a [1, 1, ..]
buffer is a copy of the whole cache in XNNPACK on every step. A local (sliding-window) layer has a ring of
`sliding_window` slots, since it never looks further back. A global layer has S slots, S the context
placeholder: the smallest prime above `max_tokens`.

The context is chosen when the artifact loads. LiteRT's "magic numbers": the LiteRT-LM engine takes the last
dimension of the input named `mask` (a prime above 10) as the context placeholder and, before the model is
compiled, rewrites every tensor dimension that is a multiple of it, and the integer constants that give RESHAPE,
BROADCAST_TO, FILL and SLICE shapes and RANGE limits, into the same multiple of the context it runs
(`max_num_tokens`, the bundle's LlmMetadata by default, which is `max_tokens`). Everything the global layers do
follows the cache's shape (nano.kv_cache's linear cache: no modulus, no length baked into a constant), so the graph
stays right at any context up to `max_tokens`. The engine fills `mask` itself (0 on the slots a row may see, a large
negative number elsewhere), and the global layers add it to their scores, beside their own mask that decides the
same. Prefill returns no logits: the engine feeds the prompt's last token through decode, so a prefill never needs
the vocabulary-sized head.

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

from export.io_names import DECODE, INPUT_POS, K_CACHE, LOGITS, MASK, TOKENS, V_CACHE, prefill_name
from nano.config import GLOBAL, ModelConfig
from nano.kv_cache import SLOT_AXIS, KVCache
from nano.layers import export_lookups
from nano.model import Decoder
from nano.quant import QuantizedWeight

def cache_names(config: ModelConfig) -> list[str]:
    return [f"{K_CACHE}{i}" for i in range(config.num_layers)] + [f"{V_CACHE}{i}" for i in range(config.num_layers)]


def context_placeholder(max_tokens: int) -> int:
    """The global caches' length in the file: the smallest prime above `max_tokens`, which the engine rewrites into
    the context it runs (it must stay above every context asked for; primes below 11 are not placeholders)."""
    n = max(max_tokens + 1, 11)
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def uses_mask(config: ModelConfig, *, prefill: bool) -> bool:
    """Whether a signature takes the engine's `mask`: where a global layer's attention counts. A model of local
    layers only has no context to choose; a prefill never needs the last layer's attention (only its cache)."""
    layers = config.layer_types[:-1] if prefill else config.layer_types
    return GLOBAL in layers


def exported_cache_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A one-sequence cache [1, kv_heads, a, b] as the artifact holds it: without its unit leading axes."""
    return shape[2:] if shape[1] == 1 else shape[1:]


def cache_shapes(config: ModelConfig, max_tokens: int) -> dict[str, tuple[int, ...]]:
    """Each cache input's shape, in `cache_names` order, with the global layers at the context placeholder."""
    cache = jax.eval_shape(lambda: KVCache.zeros(config, 1, context_placeholder(max_tokens)))
    return dict(zip(cache_names(config), [exported_cache_shape(x.shape) for x in (*cache.k, *cache.v)]))


def sequence_axis(config: ModelConfig, keys: bool) -> int:
    """The slot axis of an exported cache, from the front (the engine's metadata counts it so)."""
    rank = len(exported_cache_shape((1, config.num_kv_heads, 1, 1)))
    return rank + SLOT_AXIS["k" if keys else "v"]


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

    def fn(weights, tokens, input_pos, mask, *caches):
        weights = [w.T if f else w for w, f in zip(weights, flip)]
        net = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, weights), rest)
        cache = KVCache(k=tuple(caches[:n]), v=tuple(caches[n:]))
        hidden, cache = net(tokens, input_pos[None], cache=cache, return_hidden=True, attention_bias=mask)
        out = dict(zip(cache_names(model.config), (*cache.k, *cache.v)))
        if logits:
            out[LOGITS] = net.head(hidden)
        return out

    return fn


def export_signature(model: Decoder, length: int, max_tokens: int, *, kv_dtype=jnp.float32) -> Signature:
    """One signature as StableHLO: `decode` for length 1 (with logits), `prefill_<length>` otherwise; its caches
    stored in `kv_dtype` (attention casts them to float32)."""
    config = model.config
    name = DECODE if length == 1 else prefill_name(length)
    shapes = cache_shapes(config, max_tokens)
    weights = [jax.ShapeDtypeStruct(w.shape[::-1] if transposed(param) else w.shape, jnp.float32)
               for param, w in weight_leaves(model)]
    args = [jax.ShapeDtypeStruct((1, length), jnp.int32), jax.ShapeDtypeStruct((length,), jnp.int32)]
    inputs = [TOKENS, INPUT_POS]
    mask = None
    if uses_mask(config, prefill=name != DECODE):
        mask = jax.ShapeDtypeStruct((1, 1, length, context_placeholder(max_tokens)), jnp.float32)
        inputs.append(MASK)
    caches = [jax.ShapeDtypeStruct(s, kv_dtype) for s in shapes.values()]
    with export_lookups():
        exported = jax_export.export(jax.jit(_signature_fn(model, logits=name == DECODE)))(weights, *args, mask,
                                                                                           *caches)
    inputs += list(shapes)
    # JAX drops arguments a program does not use (a prefill never reaches the last layer's MLP or the head).
    names = [param for param, _ in weight_leaves(model)]
    kept = [names[i] for i in exported.module_kept_var_idx if i < len(weights)]
    if len(exported.module_kept_var_idx) - len(kept) != len(inputs):
        raise RuntimeError(f"{name}: the exported program dropped a token, mask or cache input")
    # A dict's outputs come out in its pytree order (sorted keys); name them in that order.
    positions = jax.tree_util.tree_unflatten(exported.out_tree, range(exported.out_tree.num_leaves))
    outputs = [None] * exported.out_tree.num_leaves
    for key, index in positions.items():
        outputs[index] = key
    return Signature(name, exported, inputs, outputs, kept)
