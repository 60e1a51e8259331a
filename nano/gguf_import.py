"""Import a Gemma 3 GGUF (any tensor type the gguf package dequantizes) as a model directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nano.checkpoint import param_shapes, save_model_dir
from nano.config import GLOBAL, LOCAL, ModelConfig
from nano.errors import NanoError
from nano.names import GGUF, name_table, to_ours
from nano.tokenizer import Tokenizer, tokenizer_from_gguf

GEMMA3_27B_LAYERS = 62  # llama.cpp: only the 27B model scales queries by (d_model / heads) instead of head_dim
# Gemma 3's five local layers per global one: what llama.cpp assumes when the file does not store the pattern.
# llama.cpp reads PATTERN_KEY as a period N (layer i global when (i + 1) % N == 0) or as one bool per layer (true:
# sliding window), and a missing or zero sliding window as every layer global.
GLOBAL_EVERY = 6
PATTERN_KEY = "gemma3.attention.sliding_window_pattern"
_UNTIED_HEAD = "output.weight"


def open_gguf(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise NanoError(f"{path} does not exist or is not a file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        raise NanoError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None


def _field(reader, key, default=None, *, required=True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise NanoError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise NanoError(f"unknown architecture {arch!r} in GGUF; nano imports Gemma 3 ('gemma3') models")

    def meta(key, default=None):
        return _field(reader, f"gemma3.{key}", default)

    num_layers, d_model = int(meta("block_count")), int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    window = int(_field(reader, "gemma3.attention.sliding_window", 0, required=False)) or None
    global_every, layer_kinds = _layer_pattern(reader, num_layers) if window else (GLOBAL_EVERY, None)
    rope_scaling = _field(reader, "gemma3.rope.scaling.type", "none", required=False)
    softcap = _field(reader, "gemma3.final_logit_softcapping", 0.0, required=False)
    try:
        return ModelConfig(
            vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(meta("attention.head_count_kv")),
            head_dim=int(meta("attention.key_length")),
            ffn_dim=int(meta("feed_forward_length")),
            sliding_window=window,
            global_every=global_every,
            layer_kinds=layer_kinds,
            rope_base_global=float(meta("rope.freq_base")),
            # Newer converters store the local base; llama.cpp's Gemma 3 loader assumes 10,000 when it is absent.
            rope_base_local=float(_field(reader, "gemma3.rope.freq_base_swa", 10_000.0, required=False)),
            rope_scale_global=float(_field(reader, "gemma3.rope.scaling.factor", 1.0)) if rope_scaling == "linear"
            else 1.0,
            norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
            query_pre_attn_scalar=d_model / num_heads if num_layers == GEMMA3_27B_LAYERS else None,
            final_logit_softcap=float(softcap) or None,
            max_seq_len=int(meta("context_length")),
        )
    except KeyError as e:
        raise NanoError(f"GGUF metadata lacks {e.args[0]}") from None
    except ValueError as e:
        raise NanoError(f"GGUF metadata describes an impossible model: {e}") from None


def _layer_pattern(reader, num_layers: int) -> tuple[int, tuple[str, ...] | None]:
    """(global_every, layer_kinds) from PATTERN_KEY, read as llama.cpp reads it."""
    pattern = _field(reader, PATTERN_KEY, GLOBAL_EVERY, required=False)
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise NanoError(f"GGUF {PATTERN_KEY} lists {len(pattern)} layers, the model has {num_layers}")
        return GLOBAL_EVERY, tuple(LOCAL if local else GLOBAL for local in pattern)
    if int(pattern) == 0:  # llama.cpp: a period of 0 makes every layer local
        return GLOBAL_EVERY, (LOCAL,) * num_layers
    return int(pattern), None


def params_from_gguf(reader, config: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 and map it onto our names (kernels transposed to [in, out])."""
    tensors = {t.name: t for t in reader.tensors}
    expected = param_shapes(config)
    params = {}
    for ours, (theirs, kind) in name_table(config.num_layers, GGUF).items():
        if theirs not in tensors:
            raise NanoError(f"GGUF lacks tensor {theirs}")
        value = _dequantize(tensors[theirs])
        want = expected[ours][::-1] if kind == "kernel" else expected[ours]  # GGUF kernels are [out, in]
        if value.shape != want:
            raise NanoError(f"GGUF tensor {theirs} has shape {value.shape}, the config needs {want}")
        params[ours] = to_ours(value, kind, GGUF)
    if _UNTIED_HEAD in tensors:  # our decoder ties the head to the embedding, as every Gemma does
        head = _dequantize(tensors[_UNTIED_HEAD])
        embedding = params["embedder.embedding"]
        if head.shape != embedding.shape or not np.allclose(head, embedding, atol=np.abs(embedding).max() / 64):
            raise NanoError(f"GGUF has an output head ({_UNTIED_HEAD}) that differs from the embedding; "
                            "nano models tie them")
    return params


def _dequantize(tensor) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    except NotImplementedError:
        raise NanoError(f"{tensor.name}: tensor type {tensor.tensor_type.name} cannot be dequantized") from None
    except ValueError as e:
        raise NanoError(f"{tensor.name}: damaged tensor data ({e})") from None


def import_gguf(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tokenizer: Tokenizer = tokenizer_from_gguf(reader)
    params = params_from_gguf(reader, config)
    provenance = f'{{"source": "{Path(path).name}", "format": "gguf"}}\n'
    return save_model_dir(config, params, tokenizer, out, overwrite=overwrite, extra={"source.json": provenance})
