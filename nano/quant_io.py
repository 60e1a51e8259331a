"""Quantized model directories: `quant.json` beside `config.json`, codes and scales among the parameters.

A quantized tensor NAME is stored as NAME.codes (int4: two per byte along the contraction axis, see
`nano.quant.pack_int4`; int8: as is) and NAME.scales. `quant.json` says which tensors are quantized and how, with
the method and its settings; a directory without it is a float model. A quant.json that cannot be read, or that
does not describe the stored parameters exactly, is refused with the reason.
"""

from __future__ import annotations

import json
import math

import numpy as np

from nano.config import ModelConfig
from nano.errors import NanoError
from nano.quant_scheme import QuantSpec
from nano.quant import QuantizedWeight, pack_int4, unpack_int4

QUANT_FILE = "quant.json"
FORMAT, VERSION = "nano-quant", 1
CODES, SCALES = ".codes", ".scales"


def to_stored(params: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(arrays to write, quant.json's "tensors" entry) for flat parameters that may hold QuantizedWeights."""
    stored, tensors = {}, {}
    for name, value in params.items():
        if not isinstance(value, QuantizedWeight):
            stored[name] = np.asarray(value)
            continue
        spec = value.spec
        codes = np.asarray(value.codes, np.int8)
        stored[name + CODES] = pack_int4(codes, spec.axis) if spec.bits == 4 else codes
        stored[name + SCALES] = np.asarray(value.scales, spec.scale_dtype)
        tensors[name] = {**spec.to_dict(), "shape": list(codes.shape)}
    return stored, tensors


def quant_json(config: ModelConfig, tensors: dict[str, dict], info: dict | None) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "config_hash": config.hash, **(info or {}),
                       "tensors": tensors}, indent=2) + "\n"


def read_quant_json(path) -> dict:
    """quant.json, checked for its format and version (the tensors are checked against the parameters later)."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), dict):
        raise NanoError(f"{path} is not a nano quantization file (needs \"format\": \"{FORMAT}\" and \"tensors\")")
    if meta.get("version") != VERSION:
        raise NanoError(f"{path} has version {meta.get('version')!r}; this nano reads version {VERSION}")
    return meta


def from_stored(config: ModelConfig, stored: dict, meta: dict, *, source: str) -> dict:
    """Flat parameters (QuantizedWeights where quant.json says) from the arrays read from disk."""
    if meta.get("config_hash") != config.hash:
        raise NanoError(f"{source}: quant.json was written for another model (config hash "
                        f"{meta.get('config_hash')!r}, config.json has {config.hash!r})")
    params = {k: v for k, v in stored.items() if not k.endswith((CODES, SCALES))}
    listed = set(meta["tensors"])
    stored_q = {k.rsplit(".", 1)[0] for k in stored if k.endswith((CODES, SCALES))}
    if listed != stored_q:
        raise NanoError(f"{source}: quant.json lists {sorted(listed - stored_q)[:3] or 'no other'} tensors "
                        f"the parameters lack, and the parameters hold {sorted(stored_q - listed)[:3] or 'no other'} "
                        "quantized tensors it does not list")
    for name, entry in meta["tensors"].items():
        params[name] = _quantized(name, entry, stored, source)
    return params


def _quantized(name: str, entry: dict, stored: dict, source: str) -> QuantizedWeight:
    try:
        spec = QuantSpec(bits=int(entry["bits"]), block_size=int(entry["block_size"]), axis=int(entry["axis"]))
        shape = tuple(int(d) for d in entry["shape"])
        scale_shape = spec.scale_shape(shape)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise NanoError(f"{source}: quant.json entry for {name} is invalid ({type(e).__name__}: {e})") from None
    codes, scales = np.asarray(stored.get(name + CODES)), np.asarray(stored.get(name + SCALES))
    packed_shape = tuple(d // 2 if i == spec.axis and spec.bits == 4 else d for i, d in enumerate(shape))
    want = {CODES: (packed_shape, np.uint8 if spec.bits == 4 else np.int8), SCALES: (scale_shape, spec.scale_dtype)}
    for suffix, array in ((CODES, codes), (SCALES, scales)):
        shape_needed, dtype = want[suffix]
        if array.shape != shape_needed or array.dtype != dtype:
            raise NanoError(f"{source}: {name}{suffix} is {array.dtype}{list(array.shape)}, quant.json's "
                            f"{spec.bits}-bit block {spec.block_size or 'per-channel'} scheme needs "
                            f"{np.dtype(dtype)}{list(shape_needed)}")
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise NanoError(f"{source}: {name}{SCALES} holds non-positive or non-finite scales")
    if spec.bits == 4:
        codes = unpack_int4(codes, spec.axis)
    elif codes.min(initial=0) < spec.code_range[0]:
        raise NanoError(f"{source}: {name}{CODES} holds codes outside {spec.code_range}")
    return QuantizedWeight(codes=codes, scales=scales, spec=spec)


def weight_bits(meta: dict | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Bits per weight over all weights and over the projections alone (codes plus scales; float32 is 32)."""
    tensors = (meta or {}).get("tensors", {})

    def bits(name):
        if name in tensors:
            return QuantSpec(**{k: tensors[name][k] for k in ("bits", "block_size", "axis")}).stored_bits(shapes[name])
        return 32 * math.prod(shapes[name])

    linear = [n for n in shapes if n.endswith(".kernel")]
    count = lambda names: sum(math.prod(shapes[n]) for n in names)  # noqa: E731
    return {"bits_per_weight": sum(map(bits, shapes)) / count(shapes),
            "bits_per_linear_weight": sum(map(bits, linear)) / count(linear)}
