"""Import a Hugging Face Gemma 3 checkpoint (config.json + safetensors + tokenizer.model) as a model directory.

Reads what `Gemma3ForCausalLM.save_pretrained` writes (`model_type` "gemma3_text"), and the text model of a
multimodal `Gemma3ForConditionalGeneration` checkpoint (`model_type` "gemma3", the text config nested under
"text_config", weights under "language_model.model." or "model.language_model."). Weights may be in one file or
in shards, with or without `model.safetensors.index.json`, in float32, float16 or bfloat16.

Conventions (see `nano.names`): `nn.Linear` kernels are stored [out, in] and become ours [in, out]; Gemma's
RMSNorm stores `w` and multiplies by `1 + w`, our scale is the whole multiplier `1 + w`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from nano.checkpoint import save_model_dir
from nano.config import GLOBAL, LOCAL, ModelConfig
from nano.errors import NanoError
from nano.names import HF, name_table, to_ours
from nano.tokenizer import Tokenizer

CONFIG_FILE, TOKENIZER_FILE, INDEX_FILE = "config.json", "tokenizer.model", "model.safetensors.index.json"
_TEXT, _MULTIMODAL = "gemma3_text", "gemma3"
_SLIDING, _FULL = "sliding_attention", "full_attention"
_GEMMA3_GLOBAL_EVERY = 6

# Gemma3TextConfig's defaults in transformers: a config.json (a multimodal one's text_config above all) leaves out
# the fields that equal them, and transformers fills them in, so the importer must too.
_HF_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "attention_bias": False,
    "use_bidirectional_attention": False,
    "tie_word_embeddings": True,
}
# Where the text model's weights live: "model.X" in Gemma3ForCausalLM, and in the two spellings multimodal
# checkpoints have used (transformers < 4.52 and later).
_PREFIXES = {_TEXT: ("model.",), _MULTIMODAL: ("model.language_model.", "language_model.model.")}
_HEADS = {_TEXT: ("lm_head.weight",), _MULTIMODAL: ("lm_head.weight", "language_model.lm_head.weight")}
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_tanh")
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def read_hf_config(src: Path) -> tuple[dict, str]:
    """The text model's settings from `src/config.json`, HF's defaults filled in, and the checkpoint's model_type."""
    path = src / CONFIG_FILE
    if not path.is_file():
        raise NanoError(f"{src} has no {CONFIG_FILE}; a Hugging Face checkpoint directory needs one")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoError(f"{path} is not valid JSON ({e})") from None
    return hf_text_config(data, where=str(path))


def hf_text_config(data, *, where: str = CONFIG_FILE) -> tuple[dict, str]:
    """(the text model's settings with HF's defaults filled in, model_type) from a config.json object."""
    if not isinstance(data, dict):
        raise NanoError(f"{where} does not hold a JSON object")
    model_type = data.get("model_type")
    if model_type == _MULTIMODAL:
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise NanoError(f"{where}: model_type 'gemma3' without a text_config object")
        data = text
    elif model_type != _TEXT:
        raise NanoError(f"unknown architecture {model_type!r} in {where}; nano imports Gemma 3 "
                        f"('gemma3_text', or 'gemma3' with a text_config) checkpoints")
    return {**_HF_DEFAULTS, **data}, model_type


def layer_pattern_from(layer_types, num_layers: int) -> tuple[int, tuple[str, ...] | None]:
    """(global_every, layer_kinds) for HF's `layer_types`: the N of "every Nth layer is global" where the list is
    that regular pattern, else Gemma 3's 6 with each layer's kind spelled out (a depth-pruned student's)."""
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or not set(layer_types) <= {_SLIDING, _FULL}:
        raise NanoError(f"config.json layer_types must list {num_layers} of '{_SLIDING}' / '{_FULL}', "
                        f"got {layer_types!r}")
    full = [i for i, t in enumerate(layer_types) if t == _FULL]
    every = full[0] + 1 if full else num_layers + 1  # all sliding: no layer is a multiple of N
    if any((t == _FULL) != ((i + 1) % every == 0) for i, t in enumerate(layer_types)):
        return _GEMMA3_GLOBAL_EVERY, tuple(GLOBAL if t == _FULL else LOCAL for t in layer_types)
    return every, None


def _rope(cfg: dict) -> tuple[float, float, float]:
    """(global base, local base, global linear scale), from `rope_parameters` (transformers 5) or the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling`, resolved as transformers does."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise NanoError(f"config.json rope_parameters must be an object, got {params!r}")
    full, sliding = dict(params.get(_FULL) or {}), dict(params.get(_SLIDING) or {})
    if cfg.get("rope_scaling"):
        if not isinstance(cfg["rope_scaling"], dict):
            raise NanoError(f"config.json rope_scaling must be an object, got {cfg['rope_scaling']!r}")
        full.update(cfg["rope_scaling"])
    full.setdefault("rope_theta", cfg["rope_theta"])
    sliding.setdefault("rope_theta", cfg["rope_local_base_freq"])

    def kind(p):
        return p.get("rope_type", p.get("type", "default"))

    if kind(sliding) != "default":
        raise NanoError(f"unsupported RoPE scaling {kind(sliding)!r} on sliding-window layers; nano has none there")
    if kind(full) not in ("default", "linear"):
        raise NanoError(f"unsupported RoPE scaling {kind(full)!r}; nano supports 'linear' (as Gemma 3 4B+ uses)")
    scale = float(full.get("factor", 1.0)) if kind(full) == "linear" else 1.0
    return float(full["rope_theta"]), float(sliding["rope_theta"]), scale


def config_from_hf(cfg: dict) -> ModelConfig:
    """Map a Gemma3TextConfig dict onto ours; NanoError for what our decoder does not compute."""
    if cfg["hidden_activation"] not in _TANH_GELU:
        raise NanoError(f"unsupported hidden_activation {cfg['hidden_activation']!r}; Gemma 3 uses gelu_pytorch_tanh")
    if cfg["attn_logit_softcapping"] is not None:
        raise NanoError("attention logit softcapping (attn_logit_softcapping) is not supported; Gemma 3 has none")
    if cfg["attention_bias"]:
        raise NanoError("attention biases (attention_bias: true) are not supported; Gemma 3 has none")
    if cfg["use_bidirectional_attention"]:
        raise NanoError("bidirectional attention (an embedding model) is not supported; nano decoders are causal")
    try:
        num_layers = int(cfg["num_hidden_layers"])
        if "layer_types" in cfg:
            global_every, layer_kinds = layer_pattern_from(cfg["layer_types"], num_layers)
        else:
            global_every, layer_kinds = int(cfg["sliding_window_pattern"]), None
        rope_global, rope_local, rope_scale = _rope(cfg)
        softcap = cfg["final_logit_softcapping"]
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            num_layers=num_layers,
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg["num_key_value_heads"]),
            head_dim=int(cfg["head_dim"]),
            ffn_dim=int(cfg["intermediate_size"]),
            sliding_window=None if cfg["sliding_window"] is None else int(cfg["sliding_window"]),
            global_every=global_every,
            layer_kinds=layer_kinds,
            rope_base_local=rope_local,
            rope_base_global=rope_global,
            rope_scale_global=rope_scale,
            norm_eps=float(cfg["rms_norm_eps"]),
            query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
            final_logit_softcap=None if softcap is None else float(softcap),
            max_seq_len=int(cfg["max_position_embeddings"]),
        )
    except (TypeError, ValueError) as e:
        raise NanoError(f"config.json describes an impossible model: {e}") from None
    except KeyError as e:
        raise NanoError(f"config.json lacks {e.args[0]}") from None


def tensor_files(src: Path) -> dict[str, Path]:
    """{tensor name: safetensors file}: from the shard index where there is one, else from every *.safetensors."""
    index = src / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: src / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise NanoError(f"{index} is not a valid shard index ({type(e).__name__}: {e})") from None
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise NanoError(f"{src} has no *.safetensors files")
    names = {}
    for file in files:
        for name in _open(file).keys():
            names.setdefault(name, file)
    return names


def _open(file: Path):
    if not file.is_file():
        raise NanoError(f"missing weights file {file}")
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # SafetensorError, OSError... on a damaged header
        raise NanoError(f"{file} is not a readable safetensors file: {e}") from None


class _Reader:
    """Reads tensors by name as float32, keeping each file open once."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.handles = files, {}

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            value = self._handle(name).get_tensor(name)
        except Exception as e:  # a name the index lists but the file lacks, or damaged data
            raise NanoError(f"cannot read tensor {name} from {self.files[name].name}: {e}") from None
        if value.dtype.name not in _FLOATS:  # bfloat16 arrives as ml_dtypes' type, which casts like the others
            raise NanoError(f"tensor {name} has dtype {value.dtype}; nano imports {', '.join(_FLOATS)} weights")
        return value.astype(np.float32)

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = _open(file)
        try:
            self.handles[file].get_slice(name)
        except Exception:
            raise NanoError(f"{file.name} lacks tensor {name} (listed in {INDEX_FILE})") from None
        return self.handles[file]


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from flax import nnx

    from nano.checkpoint import param_path
    from nano.model import abstract_model

    state = nnx.state(abstract_model(config), nnx.Param)
    return {param_path(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def params_from_hf(reader: _Reader, config: ModelConfig, model_type: str, *, tied: bool = True
                   ) -> dict[str, np.ndarray]:
    """Every tensor as float32 under our names: kernels transposed to [in, out], norms 1 + w. An `lm_head.weight`
    in the files must equal the embedding (it always must when `tied` is false: nano's head is the embedding)."""
    prefixes = _PREFIXES[model_type]
    prefix = next((p for p in prefixes if reader.has(p + "embed_tokens.weight")), prefixes[0])
    expected = _expected_shapes(config)
    params = {}
    for ours, (theirs, kind) in name_table(config.num_layers, HF).items():
        theirs = prefix + theirs.removeprefix("model.")
        if not reader.has(theirs):
            raise NanoError(f"the checkpoint lacks tensor {theirs}")
        want = expected[ours][::-1] if kind == "kernel" else expected[ours]
        if reader.shape(theirs) != want:
            raise NanoError(f"tensor {theirs} has shape {reader.shape(theirs)}, config.json needs {want}")
        params[ours] = to_ours(reader.get(theirs), kind, HF)
    heads = [h for h in _HEADS[model_type] if reader.has(h)]
    if not heads and not tied:
        raise NanoError("config.json unties the output head (tie_word_embeddings: false) but there is no "
                        "lm_head.weight")
    for head in heads:
        if not np.array_equal(reader.get(head), params["embedder.embedding"]):
            raise NanoError(f"{head} differs from the token embedding; nano models tie the output head to it")
    return params


def import_safetensors(src_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    src = Path(src_dir)
    if not src.is_dir():
        raise NanoError(f"{src} does not exist or is not a directory")
    hf_config, model_type = read_hf_config(src)
    config = config_from_hf(hf_config)
    if not (src / TOKENIZER_FILE).is_file():
        raise NanoError(f"{src} has no {TOKENIZER_FILE} (the SentencePiece model)")
    tokenizer = Tokenizer.load(src / TOKENIZER_FILE)
    reader = _Reader(tensor_files(src))
    params = params_from_hf(reader, config, model_type, tied=bool(hf_config["tie_word_embeddings"]))
    source = {"source": src.resolve().name, "format": "safetensors", "model_type": model_type}
    if model_type == _MULTIMODAL and tokenizer.vocab_size < config.vocab_size:
        # The multimodal embedding has rows past the SentencePiece vocabulary (image tokens, which the vision
        # tower's features replace): a text model cannot reach them, so they are dropped.
        source["vocab_rows_dropped"] = config.vocab_size - tokenizer.vocab_size
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
        params["embedder.embedding"] = params["embedder.embedding"][: tokenizer.vocab_size]
    provenance = json.dumps(source)
    return save_model_dir(config, params, tokenizer, out, overwrite=overwrite,
                          extra={"source.json": provenance + "\n"})
