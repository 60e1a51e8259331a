"""The one table from our parameter names to the names of the checkpoint formats we import and export.

`{i}` is the layer index. Kind says how the stored tensor becomes ours (`to_ours`) and back (`to_source`):
- "kernel": stored [out, in] (GGUF in numpy order, Hugging Face `nn.Linear`), ours is [in, out].
- "norm": RMSNorm multiplier. GGUF already stores `1 + w`; Hugging Face Gemma stores `w`.
- "embedding": [vocab, d_model] in both.
"""

import numpy as np

# ours                   GGUF                          Hugging Face (Gemma3ForCausalLM)            kind
TOP = [
    ("embedder.embedding", "token_embd.weight", "model.embed_tokens.weight", "embedding"),
    ("final_norm.scale", "output_norm.weight", "model.norm.weight", "norm"),
]
PER_LAYER = [
    ("attn_norm.scale", "attn_norm.weight", "input_layernorm.weight", "norm"),
    ("attn.q_proj.kernel", "attn_q.weight", "self_attn.q_proj.weight", "kernel"),
    ("attn.k_proj.kernel", "attn_k.weight", "self_attn.k_proj.weight", "kernel"),
    ("attn.v_proj.kernel", "attn_v.weight", "self_attn.v_proj.weight", "kernel"),
    ("attn.o_proj.kernel", "attn_output.weight", "self_attn.o_proj.weight", "kernel"),
    ("attn.q_norm.scale", "attn_q_norm.weight", "self_attn.q_norm.weight", "norm"),
    ("attn.k_norm.scale", "attn_k_norm.weight", "self_attn.k_norm.weight", "norm"),
    ("post_attn_norm.scale", "post_attention_norm.weight", "post_attention_layernorm.weight", "norm"),
    ("mlp_norm.scale", "ffn_norm.weight", "pre_feedforward_layernorm.weight", "norm"),
    ("mlp.gate.kernel", "ffn_gate.weight", "mlp.gate_proj.weight", "kernel"),
    ("mlp.up.kernel", "ffn_up.weight", "mlp.up_proj.weight", "kernel"),
    ("mlp.down.kernel", "ffn_down.weight", "mlp.down_proj.weight", "kernel"),
    ("post_mlp_norm.scale", "post_ffw_norm.weight", "post_feedforward_layernorm.weight", "norm"),
]
GGUF, HF = 0, 1
_HF_LAYER_PREFIX = "model.layers.{i}."


def name_table(num_layers: int, source: int) -> dict[str, tuple[str, str]]:
    """{our name: (source name, kind)} for a model of `num_layers` layers; source is GGUF or HF."""
    table = {ours: (names[source], kind) for ours, *names, kind in TOP}
    for i in range(num_layers):
        for ours, *names, kind in PER_LAYER:
            prefix = f"blk.{i}." if source == GGUF else _HF_LAYER_PREFIX.format(i=i)
            table[f"layers.{i}.{ours}"] = (prefix + names[source], kind)
    return table


def to_ours(value: np.ndarray, kind: str, source: int) -> np.ndarray:
    """A tensor as `source` stores it (float32), in our layout and convention."""
    if kind == "kernel":
        return np.ascontiguousarray(value.T)
    if kind == "norm" and source == HF:
        return 1.0 + value
    return value


def to_source(value: np.ndarray, kind: str, source: int) -> np.ndarray:
    """The reverse of `to_ours`: our float32 parameter as `source` stores it. A Hugging Face norm `w = scale - 1`
    is a float32 exactly for every scale >= 0.5, so `1 + w` gives the scale back bit for bit; a smaller scale comes
    back within 2**-25 (float32 `1 + w` cannot land on it)."""
    if kind == "kernel":
        return np.ascontiguousarray(value.T)
    if kind == "norm" and source == HF:
        return value - np.float32(1.0)
    return value
