"""The settings of one quantization (`nano quantize`'s options), free of JAX imports so the command line starts
fast; `quantize.pipeline` carries them out and quant.json records them."""

from __future__ import annotations

import dataclasses

from nano.errors import NanoError
from nano.quant_scheme import CHANNEL, EMBEDDINGS, QuantScheme, QuantSpec

METHODS = ("rtn", "gptq", "awq")
# A decoder block's projections, as --int8 names them.
PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate", "mlp.up", "mlp.down")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    method: str = "rtn"
    block_size: int = 32  # 0: one scale per output channel
    embeddings: str = "int8"  # the tied embedding / output head: int8 per row, int4 in blocks, or float
    calibration: str | None = None  # a text file; None: the default corpus's train split
    samples: int = 128  # calibration sequences (GPTQ, AWQ)
    seq_len: int = 512
    act_order: bool = True  # GPTQ
    damp: float = 0.01  # GPTQ: Hessian damping, a fraction of its mean diagonal
    int8: tuple[str, ...] = ()  # projections (PROJECTIONS) kept at int8 per channel in every block
    rotate: int = 128  # the Hadamard rotations (nano.rotation): the largest block up to this; 0: none

    def check(self) -> None:
        if self.method not in METHODS:
            raise NanoError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.embeddings not in EMBEDDINGS:
            raise NanoError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, got {self.embeddings!r}")
        try:
            self.scheme
        except NanoError as e:
            raise NanoError(f"--block-size: {e}") from None
        if self.samples < 1 or self.seq_len < 2:
            raise NanoError("--samples must be at least 1 and --seq-len at least 2")
        unknown = [name for name in self.int8 if name not in PROJECTIONS]
        if unknown:
            raise NanoError(f"--int8 takes projection names ({', '.join(PROJECTIONS)}), got {', '.join(unknown)}")
        if self.rotate < 0 or self.rotate & (self.rotate - 1) or self.rotate == 1:
            raise NanoError(f"--rotate takes a power of two (the Hadamard block) or 0 for none, got {self.rotate}")
        if not 0 < self.damp < 1:
            raise NanoError(f"--damp must be in (0, 1), got {self.damp}")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(4, self.block_size)

    def tensor_specs(self, names) -> dict[str, QuantSpec]:
        """The scheme's spec of each parameter, the --int8 projections' kernels int8 per channel instead."""
        specs = self.scheme.tensor_specs(names, embeddings=self.embeddings)
        for name in specs:
            if any(name.endswith(f".{projection}.kernel") for projection in self.int8):
                specs[name] = QuantSpec(8, CHANNEL, 0)
        return specs

    def rotation(self, dim: int) -> int | None:
        """The Hadamard block an input of `dim` channels is rotated by: the largest power of two up to --rotate
        that divides dim (128 divides every full-size preset's d_model and ffn_dim), None for none."""
        block = self.rotate
        while block >= 2 and dim % block:
            block //= 2
        return block if block >= 2 else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_projections(text: str | None) -> tuple[str, ...]:
    """'mlp.down,attn.v_proj' → ('mlp.down', 'attn.v_proj'); checked by QuantizeSettings.check."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def parse_block_size(text: str) -> int:
    if str(text).lower() in ("channel", "per-channel", "0"):
        return 0
    try:
        return int(text)
    except ValueError:
        raise NanoError(f"--block-size takes a number of weights (32, 64, 128) or 'channel', got {text!r}") from None
