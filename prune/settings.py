"""The settings of one pruning (`nano prune`'s options), free of JAX imports so the command line starts fast;
`prune.run` carries them out and prune.json records them."""

from __future__ import annotations

import dataclasses

from nano.errors import NanoError

AXES = ("layers", "ffn_dim", "num_heads", "d_model", "vocab_size")  # the sizes a pruning can cut
OPTIONS = {"layers": "--layers", "ffn_dim": "--ffn-dim", "num_heads": "--num-heads", "d_model": "--d-model",
           "vocab_size": "--vocab-size", "keep_layers": "--keep-layers"}


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    calibration: tuple[str, ...] = ("stdlib",)  # nano.documents sources; their held-out split is never read
    layers: int | None = None  # keep this many layers, the most important by drop_nll
    keep_layers: tuple[int, ...] | None = None  # or exactly these teacher layers
    ffn_dim: int | None = None
    num_heads: int | None = None
    d_model: int | None = None
    vocab_size: int | None = None
    samples: int = 32  # calibration windows for the importance scores
    seq_len: int = 256
    batch_size: int = 8

    def check(self, config=None) -> None:
        """The settings alone, and with the teacher's `config` against it."""
        for name in (*AXES, "samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise NanoError(f"{OPTIONS.get(name, '--' + name.replace('_', '-'))} must be a positive integer, "
                                f"got {value!r}")
        if self.seq_len < 2:
            raise NanoError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.layers is not None and self.keep_layers is not None:
            raise NanoError("--layers N chooses layers by importance, --keep-layers names them: give one of the two")
        if not self.calibration:
            raise NanoError("--calibration needs at least one source")
        if config is not None:
            self._check_against(config)

    def _check_against(self, config) -> None:
        sizes = {"layers": config.num_layers, "ffn_dim": config.ffn_dim, "num_heads": config.num_heads,
                 "d_model": config.d_model, "vocab_size": config.vocab_size}
        for name, teacher in sizes.items():
            value = getattr(self, name)
            if value is not None and value > teacher:
                raise NanoError(f"{OPTIONS[name]} {value} is larger than the teacher's {teacher}: pruning only cuts")
        if self.num_heads is not None and self.num_heads % config.num_kv_heads:
            raise NanoError(f"--num-heads {self.num_heads} does not divide among the teacher's {config.num_kv_heads} "
                            f"KV groups: every group must keep the same number of query heads")
        if self.d_model is not None and self.d_model % 2:
            raise NanoError(f"--d-model must be even (rotary and int4 packing need pairs), got {self.d_model}")
        kept = self.keep_layers
        if kept is not None and (list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= config.num_layers):
            raise NanoError(f"--keep-layers must be increasing indices of the teacher's {config.num_layers} layers, "
                            f"got {list(kept)}")

    @property
    def axes(self) -> list[str]:
        """The axes this pruning cuts."""
        cut = [name for name in AXES if getattr(self, name) is not None]
        return cut + ["layers"] if self.keep_layers is not None else cut

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,2,4-7' → (0, 2, 4, 5, 6, 7)."""
    layers = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise NanoError(f"--keep-layers takes layer indices like 0,2,4-7, got {text!r}") from None
    return tuple(layers)
