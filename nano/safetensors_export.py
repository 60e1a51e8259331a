"""Export a model as a Hugging Face Gemma 3 checkpoint that `transformers.Gemma3ForCausalLM` loads: the exact
reverse of `nano.safetensors_import`.

Writes what `Gemma3ForCausalLM.save_pretrained` would: `config.json` (a Gemma3TextConfig, `layer_types` carrying
each layer's kind), the weights under Hugging Face names and conventions (`nano.names`: kernels [out, in], norms
`w` of `1 + w`, the tied embedding once, no `lm_head.weight`) in float32, one `model.safetensors` or, past
`SHARD_BYTES`, shards listed in `model.safetensors.index.json`; `generation_config.json` and the SentencePiece
`tokenizer.model` as is.

The rope settings are written both as transformers 5 spells them (`rope_parameters`, per layer type) and in the
older keys of the published Gemma 3 checkpoints (`rope_theta`, `rope_local_base_freq`, `rope_scaling`), with the
same values, so either generation of transformers reads the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nano.config import GLOBAL, ModelConfig
from nano.errors import NanoError
from nano.files import atomic_directory
from nano.names import HF, name_table, to_source
from nano.resolve import load_float_params, refuse_existing
from nano.safetensors_import import CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, _FULL, _SLIDING, _TEXT
from nano.tokenizer import Tokenizer

SHARD_BYTES = 2 * 10**9  # past this the weights go into shards, as save_pretrained's "2GB" does
SINGLE_FILE, GENERATION_FILE = "model.safetensors", "generation_config.json"


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json for Gemma3ForCausalLM."""
    full = {"rope_type": "default", "rope_theta": config.rope_base_global}
    if config.rope_scale_global != 1.0:
        full.update(rope_type="linear", factor=config.rope_scale_global)
    sliding = {"rope_type": "default", "rope_theta": config.rope_base_local}
    out = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": _TEXT,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {_FULL: full, _SLIDING: sliding},
        "rope_theta": config.rope_base_global,
        "rope_local_base_freq": config.rope_base_local,
        "rope_scaling": {"rope_type": "linear", "factor": config.rope_scale_global}
        if config.rope_scale_global != 1.0 else None,
        # transformers builds a sliding-window mask whether or not a layer uses it, so an all-global model
        # (sliding_window None) gets its context there; layer_types still makes every layer full attention.
        "sliding_window": config.sliding_window or config.max_seq_len,
        "layer_types": [_FULL if kind == GLOBAL else _SLIDING for kind in config.layer_types],
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
        "final_logit_softcapping": config.final_logit_softcap,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": "float32",
        "nano_config_hash": config.hash,
    }
    if config.layer_kinds is None and config.sliding_window is not None:
        out["sliding_window_pattern"] = config.global_every  # for transformers before layer_types
    return out


def generation_config(tokenizer: Tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
            "pad_token_id": tokenizer.pad_id}


def shards(tensors: dict[str, np.ndarray], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into groups of at most `limit` bytes (a larger tensor alone)."""
    groups, size = [[]], 0
    for name, value in tensors.items():
        if groups[-1] and size + value.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += value.nbytes
    return groups


def write_safetensors(out: str | Path, config: ModelConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer,
                      *, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the checkpoint directory atomically (under a temporary name, renamed when complete)."""
    from safetensors.numpy import save_file

    if tokenizer.vocab_size != config.vocab_size:
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {config.vocab_size}")
    tensors = {theirs: to_source(np.asarray(params[ours], np.float32), kind, HF)
               for ours, (theirs, kind) in name_table(config.num_layers, HF).items()}
    groups = shards(tensors, shard_bytes)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(config, tokenizer), indent=2) + "\n")
        (tmp / GENERATION_FILE).write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        files = [SINGLE_FILE] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        for file, names in zip(files, groups):
            save_file({name: tensors[name] for name in names}, str(tmp / file), metadata={"format": "pt"})
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                     "weight_map": {name: file for file, names in zip(files, groups) for name in names}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return Path(out)


def export_safetensors(model: str | Path, out: str | Path, *, dequantize: bool = False, overwrite: bool = False,
                       shard_bytes: int = SHARD_BYTES) -> Path:
    """MODEL (a model directory or the embedded teacher's name) as a Hugging Face checkpoint directory `out`."""
    refuse_existing(out, overwrite)
    config, params, tokenizer = load_float_params(model, dequantize=dequantize, target="safetensors")
    return write_safetensors(out, config, params, tokenizer, overwrite=overwrite, shard_bytes=shard_bytes)
