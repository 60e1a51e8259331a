"""Export a model as a Gemma 3 GGUF that llama.cpp and Ollama load: the exact reverse of `nano.gguf_import`.

Tensors go through the one name table (`nano.names`): kernels [out, in], norms as the whole multiplier `1 + w`
(always float32, as llama.cpp's converter keeps 1-D tensors), the embedding once (llama.cpp ties the head to it).
The metadata is what llama.cpp's Gemma 3 loader reads (its `llama_model_gemma3::load_arch_hparams`): the shapes,
the RMSNorm epsilon, both rope bases (`rope.freq_base_swa` for the sliding-window layers), linear rope scaling,
the final logit softcap, the sliding window and the per-layer pattern (`attention.sliding_window_pattern`: the
period N where every Nth layer is global, else one bool per layer, true for sliding window).

What the file cannot say is refused (`check_llama_cpp`): llama.cpp derives the query scale from the layer count
(1/sqrt(head_dim), or 1/sqrt(d_model / heads) at 62 layers) and reads no query_pre_attn_scalar.

The tokenizer goes as llama.cpp's converter writes a SentencePiece model ("llama": pieces, scores, types, special
ids); user-defined pieces carry ' ' where SentencePiece has '▁'. GGUF has no room for a normaliser: a tokenizer
with one (NFKC, collapsed whitespace runs) loses it, as it would through llama.cpp's own converter. Gemma's has
none, nor have the students cut from it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from nano.config import LOCAL, ModelConfig
from nano.errors import NanoError
from nano.files import atomic_write
from nano.gguf_import import GEMMA3_27B_LAYERS
from nano.names import GGUF, name_table, to_source
from nano.resolve import load_float_params, refuse_existing, resolve_config
from nano.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "bf16")
_LLAMA_MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
_USER_DEFINED = sp_pb2.ModelProto.SentencePiece.USER_DEFINED


def check_llama_cpp(config: ModelConfig) -> None:
    """NanoError naming what llama.cpp's Gemma 3 loader cannot represent, if anything."""
    if config.num_layers > _LLAMA_MAX_LAYERS:
        raise NanoError(f"llama.cpp loads at most {_LLAMA_MAX_LAYERS} layers; this model has {config.num_layers}")
    scalar = config.d_model // config.num_heads if config.num_layers == GEMMA3_27B_LAYERS else config.head_dim
    if not math.isclose(config.query_scale, scalar ** -0.5, rel_tol=1e-6):
        raise NanoError(f"llama.cpp's Gemma 3 loader cannot represent this model: it scales queries by "
                        f"1/sqrt({scalar}) for {config.num_layers} layers (GGUF stores no query_pre_attn_scalar), "
                        f"this model by 1/sqrt({config.query_pre_attn_scalar or config.head_dim:g})")


def tokenizer_fields(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, GGUF token types) as llama.cpp's converter writes a SentencePiece model; the reverse of
    `nano.tokenizer.tokenizer_from_gguf`. GGUF's token types are SentencePiece's piece types."""
    proto = sp_pb2.ModelProto.FromString(tokenizer.proto)
    pieces = [p.piece.replace("▁", " ") if p.type == _USER_DEFINED else p.piece for p in proto.pieces]
    return pieces, [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]


def _metadata(w, config: ModelConfig, tokenizer: Tokenizer, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base_global)
    w.add_rope_freq_base_swa(config.rope_base_local)
    if config.rope_scale_global != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scale_global)
    if config.final_logit_softcap is not None:
        w.add_final_logit_softcapping(config.final_logit_softcap)
    if config.sliding_window is not None:  # none: every layer global, as llama.cpp reads a missing window
        w.add_sliding_window(config.sliding_window)
        if config.layer_kinds is None:
            w.add_sliding_window_pattern(config.global_every)
        else:
            w.add_sliding_window_pattern([kind == LOCAL for kind in config.layer_kinds])
    w.add_string("nano.config_hash", config.hash)

    pieces, scores, types = tokenizer_fields(tokenizer)
    spec = sp_pb2.ModelProto.FromString(tokenizer.proto)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for add, i in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id),
                   (w.add_unk_token_id, tokenizer.sp.unk_id()), (w.add_pad_token_id, tokenizer.pad_id)):
        if i >= 0:
            add(i)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spec.normalizer_spec.add_dummy_prefix)


def _add_tensors(w, config: ModelConfig, params: dict[str, np.ndarray], dtype: str) -> None:
    import gguf

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    for ours, (theirs, kind) in name_table(config.num_layers, GGUF).items():
        value = to_source(np.asarray(params[ours], np.float32), kind, GGUF)
        if kind == "norm" or dtype == "f32":
            w.add_tensor(theirs, value)
        elif dtype == "f16":
            w.add_tensor(theirs, value.astype(np.float16))
        else:  # bf16: raw uint8 rows; add_tensor derives the element shape from raw_dtype
            w.add_tensor(theirs, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(path: str | Path, config: ModelConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer, *,
               dtype: str = "f32", name: str = "nano student") -> Path:
    """Write the GGUF atomically (under a temporary name, renamed when complete)."""
    import gguf

    if dtype not in DTYPES:
        raise NanoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if tokenizer.vocab_size != config.vocab_size:
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {config.vocab_size}")
    check_llama_cpp(config)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, config.architecture)
        _metadata(w, config, tokenizer, name)
        _add_tensors(w, config, params, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)


def export_gguf(model: str | Path, out: str | Path, *, dtype: str = "f32", dequantize: bool = False,
                overwrite: bool = False) -> Path:
    """MODEL (a model directory or the embedded teacher's name) as a GGUF at `out`."""
    refuse_existing(out, overwrite)
    if dtype not in DTYPES:
        raise NanoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_llama_cpp(resolve_config(model))  # before loading any weights
    config, params, tokenizer = load_float_params(model, dequantize=dequantize, target="GGUF")
    return write_gguf(out, config, params, tokenizer, dtype=dtype, name=Path(str(model)).name)
