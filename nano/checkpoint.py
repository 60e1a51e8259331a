"""Model directories: `config.json` + `tokenizer.model` + Orbax parameters under `params/`, and for a quantized
model `quant.json` (see `nano.quant_io`).

Parameters are stored as a flat dict keyed by dotted module paths (`layers.3.attn.q_proj.kernel`), the same
names the import tables map onto. A directory is written under a temporary name and renamed when complete, so a
failed or killed write never leaves a half-written model under the final name.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nano.config import ModelConfig
from nano.errors import NanoError, drop_closed_loop_reports
from nano.files import DiskFull, atomic_directory, is_disk_full
from nano.model import Decoder, abstract_model
from nano.quant import QuantizedWeight
from nano.quant_io import CODES, QUANT_FILE, SCALES, from_stored, quant_json, read_quant_json, to_stored
from nano.tokenizer import Tokenizer

CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR = "config.json", "tokenizer.model", "params"


@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs each failure of a save from every thread it touched (a dozen ERROR records for one full disk);
    the caller reports the failure once, in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """Orbax for a model directory: host arrays, read or written by this process alone. In a run of several
    processes (`jax.distributed`) Orbax would otherwise wait for all of them at every save and restore."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"model-dir-{me}"))


def param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: Decoder) -> dict[str, jax.Array]:
    """{'layers.0.attn.q_proj.kernel': array, ...} for every parameter of the model."""
    return {param_path(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def float_params(model: Decoder) -> dict[str, np.ndarray]:
    """flat_params as numpy float arrays, quantized weights dequantized (to start training from them)."""
    return {name: np.asarray(v.dequantize() if isinstance(v, QuantizedWeight) else v)
            for name, v in flat_params(model).items()}


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

    A loaded model is for inference, so its float parameters take the compute dtype: bfloat16 halves the bytes
    every decoded token reads. Quantized ones keep their codes and scales. Training code that wants float32
    masters with bfloat16 compute sets `model.dtype`.
    """
    check_params(config, params, source=source)
    model = abstract_model(config, dtype=dtype)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        value = params[param_path(path)]
        if isinstance(value, QuantizedWeight):
            var.set_value(QuantizedWeight(jnp.asarray(value.codes), jnp.asarray(value.scales), value.spec))
        else:
            var.set_value(jnp.asarray(value, dtype))
    nnx.update(model, state)
    return model


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_model(model: Decoder, tokenizer: Tokenizer, out: str | Path, **kwargs) -> Path:
    return save_model_dir(model.config, flat_params(model), tokenizer, out, **kwargs)


def save_model_dir(config: ModelConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer, out: str | Path, *,
                   overwrite: bool = False, extra: dict[str, str | bytes] | None = None,
                   quant_info: dict | None = None) -> Path:
    """Write a model directory atomically. `extra` maps file names to text (or bytes) written beside config.json;
    a model with quantized weights also gets quant.json, holding `quant_info` (method, settings, report)."""
    if tokenizer.vocab_size != config.vocab_size:
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {config.vocab_size}")
    check_params(config, params)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            _write_model_dir(tmp, config, params, tokenizer, extra, quant_info)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFull(out, f"the model directory {out} was not written and nothing is left under its name") from None
    return Path(out)


def _write_model_dir(tmp: Path, config: ModelConfig, params: dict, tokenizer: Tokenizer, extra: dict | None,
                     quant_info: dict | None) -> None:
    (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
    tokenizer.save(tmp / TOKENIZER_FILE)
    for name, content in (extra or {}).items():
        if isinstance(content, bytes):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(content)
    stored, tensors = to_stored(params)
    if tensors:
        (tmp / QUANT_FILE).write_text(quant_json(config, tensors, quant_info))
    with quiet_orbax(), _local_checkpointer() as ckpt:
        ckpt.save((tmp / PARAMS_DIR).absolute(), stored)  # Orbax refuses relative paths


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
    drop_closed_loop_reports()  # a damaged file: one error line, not Orbax's teardown after it
    try:
        with _local_checkpointer() as ckpt:
            params = ckpt.restore((path / PARAMS_DIR).absolute())  # Orbax refuses relative paths
    except Exception as e:  # Orbax raises many types for a damaged checkpoint; the user needs the path and why
        raise NanoError(f"cannot read parameters from {path / PARAMS_DIR}: {type(e).__name__}: {e}") from None
    if (path / QUANT_FILE).exists():
        params = from_stored(config, params, read_quant_json(path / QUANT_FILE), source=str(path))
    elif any(k.endswith((CODES, SCALES)) for k in params):
        raise NanoError(f"{path} holds quantized parameters but no {QUANT_FILE} to say how to read them")
    return model_from_flat(config, params, dtype=dtype, source=str(path)), tokenizer


def load_quant_info(path: str | Path) -> dict | None:
    """A model directory's quant.json (checked), or None for a float model."""
    file = Path(path) / QUANT_FILE
    return read_quant_json(file) if file.exists() else None
