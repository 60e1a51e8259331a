"""`nano-export` as a library call: load (or randomly initialise) the model, choose its integer codes, convert,
write the codes, verify against JAX, bundle; the artifact appears under its name only when all of that worked."""

from __future__ import annotations

import contextlib
import importlib.metadata
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export.settings import ExportSettings, quant_bits
from nano.errors import NanoError
from nano.ui import status

TOOLS = ("nano-distill", "jax", "flax", "litert-converter", "ai-edge-litert", "ai-edge-quantizer", "litert-lm-builder")


def _versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Phases(dict):
    """Each phase's seconds and the process's peak RSS when it ended (the peak only grows, so where it jumps is
    the phase that needed the memory)."""

    @contextlib.contextmanager
    def __call__(self, key: str, message: str):
        start = time.perf_counter()
        with status(message):
            yield
        self[key] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_bytes": peak_rss_bytes()}


def _describe(model_ref: str, settings: ExportSettings):
    """(config, tokenizer or None, quant.json or None), without loading any weights."""
    from nano.checkpoint import TOKENIZER_FILE, load_config, load_quant_info
    from nano.config import GEMMA3_270M
    from nano.models import resolve_config, resolve_model_dir
    from nano.tokenizer import Tokenizer

    if settings.random_init:
        config = resolve_config(model_ref)
        tokenizer = None
        if config.vocab_size == GEMMA3_270M.vocab_size:  # the presets that share the teacher's vocabulary
            from nano.models import embedded_teacher_dir

            tokenizer = Tokenizer.load(embedded_teacher_dir() / TOKENIZER_FILE)
        return config, tokenizer, None
    source = resolve_model_dir(model_ref)
    return load_config(source), Tokenizer.load(source / TOKENIZER_FILE), load_quant_info(source)


def _load(model_ref: str, settings: ExportSettings):
    """The model: loaded, or (--random-init) initialised with seed 0, the same weights every time."""
    from nano.model import init_model
    from nano.models import load_model, resolve_config

    if settings.random_init:
        return init_model(resolve_config(model_ref), seed=0)
    return load_model(model_ref)[0]


def _integer_weights(model, quant: str, quant_info: dict | None) -> dict:
    """name → QuantizedWeight for every weight the artifact stores as integers: the model's own codes when it is
    quantized, round-to-nearest codes when a float model is asked for int8 / int4."""
    from nano.checkpoint import flat_params
    from nano.quant import CHANNEL, QuantizedWeight, QuantSpec, quantize_rtn, tensor_specs

    params = flat_params(model)
    if quant_info is not None:
        return {n: w for n, w in params.items() if isinstance(w, QuantizedWeight)}
    bits, block = quant_bits(quant)
    if bits == 8:
        specs = {n: QuantSpec(8, CHANNEL, 0) for n in params if n.endswith(".kernel")}
        specs["embedder.embedding"] = QuantSpec(8, CHANNEL, 1)
    else:
        specs = tensor_specs(params, block_size=block, embeddings="int8")
    for name, spec in specs.items():
        try:
            spec.block(params[name].shape)
        except ValueError as e:
            raise NanoError(f"cannot quantize {name} for --quant {quant}: {e}") from None
    return {name: quantize_rtn(params[name], spec) for name, spec in specs.items()}


def _float_twin(model, weights: dict):
    """The model as the artifact computes it, in float32 (each weight in `weights`, and any quantized weight,
    dequantized): what the converter sees, and the JAX reference the artifact is verified against."""
    from flax import nnx

    from nano.checkpoint import param_path
    from nano.quant import QuantizedWeight

    if not weights and not any(isinstance(v.get_value(), QuantizedWeight)
                               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))):
        return model
    twin = nnx.clone(model)
    state = nnx.state(twin, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        value = weights.get(param_path(path), var.get_value())
        if isinstance(value, QuantizedWeight):
            var.set_value(value.dequantize())
    nnx.update(twin, state)
    return twin


def _weight_source(model, weights: dict):
    """weight(i): the i-th exported weight argument as float32, as the artifact computes with it (our int codes
    dequantized). Only this closure holds the model, so the converter frees it once every weight is bound."""
    from export.graph import transposed, weight_leaves
    from export.weights import dequantized
    from nano.quant import QuantizedWeight

    source = weight_leaves(model)

    def weight(i: int) -> np.ndarray:
        name, value = source[i]
        value = weights.get(name, value)
        value = dequantized(value) if isinstance(value, QuantizedWeight) else np.asarray(value, np.float32)
        return np.ascontiguousarray(value.T) if transposed(name) else value

    return weight


def _scheme(quant_info: dict | None, settings: ExportSettings) -> str:
    if quant_info is None:
        return settings.quant or "float32"
    own = quant_info.get("scheme", "int4")
    if settings.quant in (None, own):
        return own
    if settings.quant == "float32":
        return "float32"  # the quantized model's weights, dequantized
    raise NanoError(f"the model is quantized as {own}; --quant {settings.quant} would requantize its codes. Export it "
                    f"as {own} (or float32), or export its float source with --quant {settings.quant}")


def _check_read_back(path: Path, weights: dict) -> int:
    """Every weight's codes and scales, found exactly in the written .tflite."""
    from export.weights import read_back, tflite_layout

    stored = read_back(path)
    for name, weight in weights.items():
        codes, scales = tflite_layout(weight)
        if not any(s["codes"].shape == codes.shape and np.array_equal(s["codes"], codes)
                   and np.array_equal(np.asarray(s["scales"], np.float32).reshape(-1),
                                      np.asarray(scales, np.float32).reshape(-1)) for s in stored):
            raise NanoError(f"export: {name}'s codes and scales are not in the written .tflite")
    return len(stored)


def export(model_ref: str, out: str | Path, settings: ExportSettings, *, force: bool = False) -> dict:
    """Export MODEL to `out` (.tflite or .litertlm). Returns what was done and measured."""
    from export import bundle
    from export.convert import convert
    from export.graph import DECODE, export_signature, prefill_name
    from export.runtime import LiteRTLM, quiet_native_stderr
    from export.verify import failure_line, verification_window, verify
    from nano.model import abstract_model

    out = Path(out)
    start = time.perf_counter()
    settings.check(out)
    if out.exists() and not force:
        raise NanoError(f"{out} already exists (pass --force to replace it)")
    phase = _Phases()
    config, tokenizer, quant_info = _describe(model_ref, settings)
    settings = settings.for_model(config.max_seq_len)
    settings.check(out, config.max_seq_len)
    if out.suffix == ".litertlm" and tokenizer is None:
        raise NanoError(f"{model_ref} has no tokenizer with its {config.vocab_size}-piece vocabulary; export a .tflite")
    scheme = _scheme(quant_info, settings)
    weights = {}
    if scheme not in ("float32", "fp16"):
        with phase("load", f"{'initialising' if settings.random_init else 'loading'} {model_ref}'s {scheme} codes"):
            weights = _integer_weights(_load(model_ref, settings), scheme, quant_info)
    lengths = [n for n in settings.prefill_lengths if n > 1]  # length 1 is decode itself

    def reference():
        """The model as the artifact computes it. Built when needed and dropped after, rather than held: the
        conversion's peak memory then holds no JAX copy of the weights beside the converter's own."""
        return _float_twin(_load(model_ref, settings), weights)

    def lowered_signatures():  # programs over abstract weights: shapes only, nothing allocated
        model = abstract_model(config)
        for n in [*lengths, 1]:
            yield export_signature(model, n, settings.max_tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        float_file = tmp / "float.tflite"
        with phase("convert", f"converting {len(lengths) + 1} signatures ({', '.join(map(prefill_name, lengths))}, {DECODE})"):
            convert(lowered_signatures(), _weight_source(_load(model_ref, settings), weights), float_file)
        tflite = tmp / "model.tflite"
        read_back_count = 0
        if weights:
            from export.weights import write_codes

            with phase("codes", f"writing {len(weights)} weights' {scheme} codes and scales"):
                write_codes(float_file, tflite, weights)
                read_back_count = _check_read_back(tflite, weights)
        elif scheme == "fp16":
            from export.weights import write_float16

            with phase("codes", "storing weights as float16"):
                write_float16(float_file, tflite)
        else:
            float_file.rename(tflite)
        float_file.unlink(missing_ok=True)
        convert_seconds = time.perf_counter() - start

        verification = None
        if settings.verify:
            window, text = verification_window(tokenizer, min(settings.verify_tokens, settings.max_tokens),
                                               config.vocab_size)
            with phase("verify", f"verifying against JAX on {text}"), quiet_native_stderr():
                verification = verify(lambda: LiteRTLM(tflite, threads=settings.threads), reference, window,
                                      exact=scheme == "float32")
                verification["text"] = text
            if not verification["ok"]:
                raise NanoError(failure_line(verification))

        final = tflite
        if out.suffix == ".litertlm":
            final = tmp / "model.litertlm"
            with phase("bundle", "bundling the .litertlm (tokenizer, LlmMetadata, executor metadata, provenance)"):
                bundle.build(tflite, final, tokenizer=tokenizer, config=config, max_tokens=settings.max_tokens,
                             provenance=_provenance(model_ref, config, scheme, quant_info, settings))
        final.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "model": str(model_ref), "quant": scheme, "bytes": out.stat().st_size,
            "signatures": [*map(prefill_name, lengths), DECODE], "max_tokens": settings.max_tokens,
            "int_weights": len(weights), "int_weights_read_back": read_back_count,
            "convert_seconds": round(convert_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": peak_rss_bytes(), "phases": phase, "verification": verification}


def _provenance(model_ref, config, scheme, quant_info, settings) -> dict:
    return {"source": str(model_ref), "config_hash": config.hash, "config": config.to_dict(), "quant": scheme,
            "quant_method": (quant_info or {}).get("method", "rtn" if scheme.startswith("int") else "none"),
            "random_init": settings.random_init, "max_tokens": settings.max_tokens,
            "prefill_lengths": list(settings.prefill_lengths), "versions": _versions()}
