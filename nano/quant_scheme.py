"""Quantization schemes by name and by tensor: what `nano quantize`, `nano distill --qat` and `nano-export` mean
by 'int4-b32', and how each tensor is quantized under it. A description only (no arithmetic, no JAX), so the
command line can parse and check schemes without starting JAX; `nano.quant` rounds and stores weights by it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from nano.errors import NanoError

SUPPORTED_BITS = (4, 8)
CHANNEL = 0  # block_size 0: one scale per output channel
EMBEDDINGS = ("int8", "int4", "float")  # forms of the tied embedding / output head beside an integer scheme


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: `bits`, `block_size` (CHANNEL = per channel) along contraction `axis`."""

    bits: int
    block_size: int
    axis: int

    def __post_init__(self):
        _check_bits_and_block(self.bits, self.block_size, ValueError)

    def block(self, shape: tuple[int, ...]) -> int:
        """The block length for a tensor of `shape` (the whole axis when per channel)."""
        dim = shape[self.axis]
        size = self.block_size or dim
        if dim % size:
            raise ValueError(f"block size {size} does not divide axis {self.axis} of shape {tuple(shape)}")
        return size

    @property
    def blockwise(self) -> bool:
        return self.block_size != CHANNEL

    @property
    def code_range(self) -> tuple[int, int]:
        return (-8, 7) if self.bits == 4 else (-127, 127)

    @property
    def bound(self) -> float:
        """|w| / scale at the block maximum: int4 uses the half step above 7 as well (the -8 code pays for it)."""
        return 7.5 if self.bits == 4 else 127.0

    @property
    def scale_dtype(self):
        return np.float16 if self.blockwise else np.float32

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d // self.block(shape) if i == self.axis else d for i, d in enumerate(shape))

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        """Bits on disk for a tensor of `shape`: its codes plus its scales."""
        scales = math.prod(self.scale_shape(shape)) * np.dtype(self.scale_dtype).itemsize * 8
        return math.prod(shape) * self.bits + scales

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_bits_and_block(bits: int, block_size: int, error) -> None:
    if bits not in SUPPORTED_BITS:
        raise error(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 0 or (block_size and block_size % 2):
        raise error(f"block_size must be 0 (per channel) or a positive even number, got {block_size}")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A weight format by name, as every command spells it: 'int4-b32' (int4 codes, one scale per 32 inputs),
    'int4-channel' (one scale per output channel), 'int8' (int8 per channel). The projections take the scheme; the
    tied embedding takes one of EMBEDDINGS beside it."""

    bits: int
    block_size: int = CHANNEL

    def __post_init__(self):
        _check_bits_and_block(self.bits, self.block_size, NanoError)

    @classmethod
    def parse(cls, name: str) -> "QuantScheme":
        kind, _, block = str(name).partition("-")
        bits = {"int4": 4, "int8": 8}.get(kind)
        if bits == 8 and block in ("", "channel"):
            return cls(8)
        if bits == 4 and block == "channel":
            return cls(4)
        if bits == 4 and block.startswith("b") and block[1:].isdigit() and int(block[1:]) > 0 \
                and int(block[1:]) % 2 == 0:
            return cls(4, int(block[1:]))
        raise NanoError(f"unknown weight scheme {name!r}: use int4-bN (N even, e.g. int4-b32), int4-channel or int8")

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-{'b' + str(self.block_size) if self.block_size else 'channel'}"

    def tensor_specs(self, names, *, embeddings: str = "int8") -> dict[str, "QuantSpec"]:
        """The spec of each of a decoder's parameters (`names`) this scheme quantizes: every projection kernel
        [in, out] along `in`; the tied embedding [vocab, d_model] as `embeddings` says (int8 per row, int4 in the
        scheme's blocks — blocks of 32 beside int8 projections —, or float); norms stay float."""
        if embeddings not in EMBEDDINGS:
            raise NanoError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}")
        specs = {name: QuantSpec(self.bits, self.block_size, 0) for name in names if name.endswith(".kernel")}
        if embeddings != "float":
            block = self.block_size if self.bits == 4 else 32
            spec = QuantSpec(8, CHANNEL, 1) if embeddings == "int8" else QuantSpec(4, block, 1)
            specs.update({name: spec for name in names if name.endswith("embedder.embedding")})
        return specs
