"""Model directories: `config.json` + `tokenizer.model` + Orbax parameters under `params/`.

Parameters are stored as a flat dict keyed by dotted module paths (`layers.3.attn.q_proj.kernel`), the same
names the import tables map onto. A directory is written under a temporary name and renamed when complete, so a
failed or killed write never leaves a half-written model under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nano.config import ModelConfig
from nano.errors import NanoError
from nano.model import Decoder, abstract_model
from nano.tokenizer import Tokenizer

CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR = "config.json", "tokenizer.model", "params"


def param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: Decoder) -> dict[str, jax.Array]:
    """{'layers.0.attn.q_proj.kernel': array, ...} for every parameter of the model."""
    return {param_path(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter the config needs (nothing allocated)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {param_path(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def check_params(config: ModelConfig, params: dict[str, np.ndarray], *, source: str = "parameters") -> None:
    """Strict loading: every name the config needs is present, none extra, shapes equal."""
    expected = param_shapes(config)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise NanoError(f"{source} do not match the config: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != tuple(shape):
            raise NanoError(f"{source}: {name} has shape {tuple(params[name].shape)}, the config needs {shape}")


def model_from_flat(config: ModelConfig, params: dict[str, np.ndarray], *, dtype=jnp.float32,
                    source: str = "parameters") -> Decoder:
    """Build the model from flat parameters (checked strictly first), stored in `dtype`.

    A loaded model is for inference, so its parameters take the compute dtype: bfloat16 halves the bytes every
    decoded token reads. Training code that wants float32 masters with bfloat16 compute sets `model.dtype`.
    """
    check_params(config, params, source=source)
    model = abstract_model(config, dtype=dtype)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params[param_path(path)], dtype))
    nnx.update(model, state)
    return model


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_model(model: Decoder, tokenizer: Tokenizer, out: str | Path, **kwargs) -> Path:
    return save_model_dir(model.config, flat_params(model), tokenizer, out, **kwargs)


def save_model_dir(config: ModelConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer, out: str | Path, *,
                   overwrite: bool = False, extra: dict[str, str] | None = None) -> Path:
    """Write a model directory atomically. `extra` maps file names to text written beside config.json."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise NanoError(f"{out} already exists (pass --force to replace it)")
    if tokenizer.vocab_size != config.vocab_size:
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {config.vocab_size}")
    check_params(config, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model directory is an ordinary one
    try:
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((tmp / PARAMS_DIR).absolute(), {k: np.asarray(v) for k, v in params.items()})  # Orbax: absolute
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise NanoError(f"{path} does not exist")
    if not is_model_dir(path):
        raise NanoError(f"{path} is not a model directory (no {CONFIG_FILE})")
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise NanoError(f"{path / CONFIG_FILE} is not valid JSON ({e})") from None
    return ModelConfig.from_dict(data)


def load_model_dir(path: str | Path, *, dtype=jnp.float32) -> tuple[Decoder, Tokenizer]:
    path = Path(path)
    config = load_config(path)
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanoError(f"{path}: tokenizer has {tokenizer.vocab_size} pieces, config.json {config.vocab_size}")
    if not (path / PARAMS_DIR).is_dir():
        raise NanoError(f"{path} has no {PARAMS_DIR}/ directory")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore((path / PARAMS_DIR).absolute())  # Orbax refuses relative paths
    except Exception as e:  # Orbax raises many types for a damaged checkpoint; the user needs the path and why
        raise NanoError(f"cannot read parameters from {path / PARAMS_DIR}: {type(e).__name__}: {e}") from None
    return model_from_flat(config, params, dtype=dtype, source=str(path)), tokenizer
