"""The settings of one export (`nano-export`'s options), free of JAX imports so the command line starts fast."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nano.errors import NanoError
from nano.quant_scheme import EMBEDDINGS, QuantScheme

FLOAT_FORMATS = ("float32", "fp16")
QUANTS = (*FLOAT_FORMATS, "int8", "int4-b32", "int4-b128")
DEFAULT_MAX_TOKENS = 4096
SUFFIXES = (".litertlm", ".tflite")
KV_CACHES = ("float32", "fp16")  # the KV cache's storage; attention computes in float32 either way


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    quant: str | None = None  # None: a quantized model keeps its own scheme, a float one exports float32
    prefill_lengths: tuple[int, ...] = (128, 512)
    max_tokens: int | None = None  # the most context an app may ask when it loads the artifact (the global layers'
    # KV cache); None: 4096 or the model's own context if shorter
    kv_cache: str = "float32"
    embeddings: str | None = None  # a float model's embedding for int schemes: int8, int4 or float (None: the
    # scheme's own bits, so int4 schemes store a 4-bit table)
    verify: bool = True
    random_init: bool = False
    verify_tokens: int = 1024  # held-out tokens: the first half prefilled, the second decoded and compared
    ppl_tolerance: float = 0.02  # an integer artifact's perplexity may differ by this fraction from the JAX
    # model of the device's arithmetic (Decoder.as_device)
    threads: int | None = None  # for verification; None: every core
    verify_cpus: tuple[str, ...] = ()  # also verify as these CPUs run it, emulated (export.cpu_emulation)

    def check(self, out: str | Path, max_seq_len: int | None = None) -> None:
        if Path(out).suffix not in SUFFIXES:
            raise NanoError(f"--out must end in {' or '.join(SUFFIXES)}, got {str(out)!r}")
        if self.quant is not None and self.quant not in QUANTS:
            raise NanoError(f"--quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.kv_cache not in KV_CACHES:
            raise NanoError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.embeddings is not None and self.embeddings not in EMBEDDINGS:
            raise NanoError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, got {self.embeddings!r}")
        if not 0 < self.ppl_tolerance < 1:
            raise NanoError(f"--ppl-tolerance must be a fraction between 0 and 1, got {self.ppl_tolerance}")
        if self.verify_tokens < 2:
            raise NanoError(f"verification needs at least 2 tokens, got {self.verify_tokens}")
        if self.verify_cpus and not self.verify:
            raise NanoError("--verify-cpu verifies the artifact: it cannot go with --no-verify")
        if self.verify_cpus:
            from export.cpu_emulation import cpu_model

            for cpu in self.verify_cpus:
                cpu_model(cpu)  # before the conversion, not after it
        if self.max_tokens is not None and self.max_tokens < 2:
            raise NanoError(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if max_seq_len is not None and self.max_tokens is not None and self.max_tokens > max_seq_len:
            raise NanoError(f"--max-tokens {self.max_tokens} exceeds the model's context of {max_seq_len}")
        if not self.prefill_lengths:
            raise NanoError("--prefill-lengths needs at least one length")
        for n in self.prefill_lengths:
            if n < 1:
                raise NanoError(f"prefill lengths must be positive, got {n}")
            if self.max_tokens is not None and n > self.max_tokens:
                raise NanoError(f"prefill length {n} exceeds --max-tokens {self.max_tokens}")

    def for_model(self, max_seq_len: int) -> "ExportSettings":
        """With the context resolved: --max-tokens, or 4096 capped at the model's own context."""
        return dataclasses.replace(self, max_tokens=self.max_tokens or min(DEFAULT_MAX_TOKENS, max_seq_len))


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        raise NanoError(f"--prefill-lengths takes comma-separated token counts such as 128,512, got {text!r}") from None
    return lengths


def integer_scheme(quant: str) -> QuantScheme | None:
    """The integer scheme named by --quant ('int4-b32', 'int8'), or None for a float format (float32, fp16)."""
    return None if quant in FLOAT_FORMATS else QuantScheme.parse(quant)
