"""The architecture of a Gemma-3-family decoder, and the named presets.

`ModelConfig` holds architecture only (no run state): it is what `config.json` in a model directory stores and
what every stage (distill, quantize, export) reads. Presets are overrides of one base, the teacher's own shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from nano.errors import NanoError

LOCAL, GLOBAL = "local", "global"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Gemma 3 decoder.

    Layer `i` is global (full attention, `rope_base_global`) when `(i + 1) % global_every == 0`, otherwise local
    (sliding window of `sliding_window` tokens, `rope_base_local`). `sliding_window=None` makes every layer global.
    `layer_kinds` lists each layer's kind explicitly instead, for patterns `global_every` cannot express (a
    depth-pruned student keeps each kept layer's kind); a list equal to the pattern is stored as None, so the same
    architecture has one config and one hash however it was written.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    sliding_window: int | None = 512
    global_every: int = 6
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    rope_scale_global: float = 1.0  # linear position scaling of global layers (8 on Gemma 3 4B and larger)
    norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # queries are scaled by this ** -0.5; None means head_dim
    final_logit_softcap: float | None = None
    max_seq_len: int = 32_768
    architecture: str = "gemma3"
    layer_kinds: tuple[str, ...] | None = None
    # The MLP rotates its down projection's input by a block-diagonal Hadamard matrix of this block size and the
    # down kernel is stored rotated to match (nano.rotation): the same function, easier to quantize.
    ffn_rotation: int | None = None
    # The same for the normed inputs of attention (q/k/v) and of the MLP (gate/up), their kernels stored rotated.
    input_rotation: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                     "global_every", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.architecture != "gemma3":
            raise ValueError(f"unknown architecture {self.architecture!r}; nano models are 'gemma3'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
            raise ValueError(f"final_logit_softcap must be positive or None, got {self.final_logit_softcap}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.layer_kinds is not None:
            kinds = tuple(self.layer_kinds)
            if len(kinds) != self.num_layers or not set(kinds) <= {LOCAL, GLOBAL}:
                raise ValueError(f"layer_kinds must list {self.num_layers} entries, each {LOCAL!r} or {GLOBAL!r}, "
                                 f"got {list(kinds)}")
            if self.sliding_window is None and LOCAL in kinds:
                raise ValueError("local layers need a sliding_window")
            object.__setattr__(self, "layer_kinds", None if kinds == self._pattern() else kinds)
        for field, dim in (("ffn_rotation", "ffn_dim"), ("input_rotation", "d_model")):
            block, size = getattr(self, field), getattr(self, dim)
            if block is not None and (not isinstance(block, int) or block < 2 or block & (block - 1) or size % block):
                raise ValueError(f"{field} must be a power of two dividing {dim} ({size}), got {block!r}")

    # Derived values.
    def _pattern(self) -> tuple[str, ...]:
        if self.sliding_window is None:
            return (GLOBAL,) * self.num_layers
        return tuple(GLOBAL if (i + 1) % self.global_every == 0 else LOCAL for i in range(self.num_layers))

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Each layer's kind, LOCAL or GLOBAL."""
        return self.layer_kinds or self._pattern()

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def param_count(self) -> int:
        """Exact parameter count (the tied embedding counted once)."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        mlp = 3 * d * self.ffn_dim
        norms = 4 * d
        return self.vocab_size * d + self.num_layers * (attn + mlp + norms) + d

    def flops_per_token(self, context: int) -> int:
        """Forward FLOPs per token: 2 per weight (the tied embedding counted as the head) plus attention scores and
        values over `context` earlier tokens (capped at the window on local layers)."""
        attn = sum(4 * self.num_heads * self.head_dim * (context if t == GLOBAL else min(context, self.sliding_window))
                   for t in self.layer_types)
        return 2 * self.param_count + attn

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.layer_kinds is None:  # configs written before the field existed keep their hash
            del data["layer_kinds"]
        else:
            data["layer_kinds"] = list(self.layer_kinds)
        for field in ("ffn_rotation", "input_rotation"):
            if data[field] is None:  # the same
                del data[field]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def hash(self) -> str:
        """A short content hash: artifacts record it as their source model's provenance."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if data.get("architecture", "gemma3") != "gemma3":
            raise NanoError(f"unknown architecture {data.get('architecture')!r}; nano reads Gemma 3 ('gemma3') models")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NanoError(f"config.json has unknown fields {unknown}")
        if isinstance(data.get("layer_kinds"), list):
            data = {**data, "layer_kinds": tuple(data["layer_kinds"])}
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise NanoError(f"invalid model config: {e}") from e


# The teacher: Gemma 3 270M (GGUF metadata; the local rope base is not stored in the file).
GEMMA3_270M = ModelConfig(
    vocab_size=262_144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, ffn_dim=2048,
    sliding_window=512, global_every=6,
)

# Larger Gemma 3 text decoders, as teachers (their published configurations; the 4B and 12B scale global-layer
# positions by 8). Random weights serve throughput runs (`nano distill --random-teacher`); a user's checkpoint
# imports with `nano import-safetensors`.
GEMMA3_1B = dataclasses.replace(GEMMA3_270M, d_model=1152, num_layers=26, num_heads=4, head_dim=256, ffn_dim=6912)
GEMMA3_4B = dataclasses.replace(GEMMA3_270M, d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                                ffn_dim=10240, sliding_window=1024, rope_scale_global=8.0, max_seq_len=131_072)
GEMMA3_12B = dataclasses.replace(GEMMA3_4B, d_model=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                                 ffn_dim=15360)

# Gemini Nano sizes: multi-query attention (one KV head), 32k context, the teacher's 262,144-token vocabulary.
NANO_1 = dataclasses.replace(GEMMA3_270M, d_model=2048, num_layers=22, num_heads=8, head_dim=256, ffn_dim=7808,
                             sliding_window=1024)
NANO_2 = dataclasses.replace(GEMMA3_270M, d_model=2560, num_layers=26, num_heads=10, head_dim=256, ffn_dim=11008,
                             sliding_window=1024)

# A student that distils on two CPU cores in minutes; most of its parameters are the teacher-sized vocabulary.
NANO_MICRO = dataclasses.replace(GEMMA3_270M, d_model=256, num_layers=6, num_heads=4, head_dim=64, ffn_dim=768,
                                 sliding_window=128, global_every=3, max_seq_len=2048)

# For tests: a small vocabulary, grouped-query attention and a short window so tests can cross it cheaply.
TINY = dataclasses.replace(GEMMA3_270M, vocab_size=512, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2,
                           head_dim=16, ffn_dim=128, sliding_window=8, global_every=2, max_seq_len=256)

PRESETS: dict[str, ModelConfig] = {
    "gemma3-270m": GEMMA3_270M,
    "gemma3-1b": GEMMA3_1B,
    "gemma3-4b": GEMMA3_4B,
    "gemma3-12b": GEMMA3_12B,
    "nano-1": NANO_1,
    "nano-2": NANO_2,
    "nano-micro": NANO_MICRO,
    "tiny": TINY,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise NanoError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
