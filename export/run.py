"""`nano-export` as a library call: load (or randomly initialise) the model, choose its integer codes, convert the
graph, write the weights into it, verify against JAX, bundle; the artifact appears under its name only when all of
that worked."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import time
from pathlib import Path

import numpy as np

from export.settings import ExportSettings, integer_scheme
from nano.errors import NanoError
from nano.files import disk_full_as_error, peak_rss_bytes, scratch_directory
from nano.ui import status

TOOLS = ("nano-distill", "jax", "flax", "litert-converter", "ai-edge-litert", "litert-lm-builder")


def _versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


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
    from nano.resolve import resolve_config, resolve_model_dir
    from nano.tokenizer import Tokenizer

    if settings.random_init:
        config = resolve_config(model_ref)
        tokenizer = None
        if config.vocab_size == GEMMA3_270M.vocab_size:  # the presets that share the teacher's vocabulary
            from nano.resolve import embedded_teacher_dir

            tokenizer = Tokenizer.load(embedded_teacher_dir() / TOKENIZER_FILE)
        return config, tokenizer, None
    source = resolve_model_dir(model_ref)
    return load_config(source), Tokenizer.load(source / TOKENIZER_FILE), load_quant_info(source)


def _artifact_params(model_ref: str, settings: ExportSettings, config, scheme: str, quant_info: dict | None) -> dict:
    """name → every parameter as the artifact stores it: a float array, or a QuantizedWeight (the model's own codes,
    or round-to-nearest codes when a float model is asked for int8 / int4). Built one part at a time: a random
    preset is initialised a layer at a time, and each float kernel is replaced by its codes as soon as it is made,
    so an int4 export never holds the float model."""
    import jax

    from nano.checkpoint import flat_params
    from nano.model import init_param_parts
    from nano.resolve import load_model
    from nano.quant import QuantizedWeight, quantize_rtn

    specs = {} if quant_info is not None else _rtn_specs(config, scheme, settings.embeddings)
    rtn = jax.jit(quantize_rtn, static_argnums=1)  # fused: no float temporaries the size of the weight
    parts = init_param_parts(config, seed=0) if settings.random_init else [flat_params(load_model(model_ref)[0])]
    params = {}
    for part in parts:
        for name in list(part):
            value = part.pop(name)
            if name in specs:
                value = rtn(value, specs[name])
            elif isinstance(value, QuantizedWeight) and integer_scheme(scheme) is None:
                value = value.dequantize()  # a quantized model exported as float32
            params[name] = value
    return params


def _rtn_specs(config, scheme: str, embeddings: str | None) -> dict:
    """The QuantSpec of each weight a float model rounds to nearest for `scheme` (none for float schemes)."""
    from nano.checkpoint import param_shapes

    integer = integer_scheme(scheme)
    if integer is None:
        return {}
    shapes = param_shapes(config)
    specs = integer.tensor_specs(shapes, embeddings=embeddings or ("int8" if integer.bits == 8 else "int4"))
    for name, spec in specs.items():
        try:
            spec.block(shapes[name])
        except ValueError as e:
            raise NanoError(f"cannot quantize {name} for --quant {scheme}: {e}") from None
    return specs


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
    """Every integer weight's codes and scales, found exactly in the written .tflite (one tensor in memory at a
    time: each side is keyed by a digest of its codes and scales)."""
    import hashlib

    from export.weights import read_back, tflite_layout

    def key(codes, scales) -> str:
        digest = hashlib.sha1(str(codes.shape).encode())
        for array in (np.ascontiguousarray(codes, np.int8), np.ascontiguousarray(scales, np.float32).reshape(-1)):
            digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()

    expected = {key(*tflite_layout(weight)): name for name, weight in weights.items()}
    found = {key(s["codes"], s["scales"]) for s in read_back(path)}
    missing = [name for k, name in expected.items() if k not in found]
    if missing:
        raise NanoError(f"export: {len(missing)} weights' codes and scales are not in the written .tflite "
                        f"(first: {missing[0]})")
    return len(found)


def export(model_ref: str, out: str | Path, settings: ExportSettings, *, force: bool = False) -> dict:
    """Export MODEL to `out` (.tflite or .litertlm). Returns what was done and measured."""
    from export import bundle
    from export.convert import convert
    from export.graph import DECODE, export_signature, prefill_name, transposed
    from export.weights import bind
    import jax.numpy as jnp

    from nano.model import abstract_model
    from nano.quant import QuantizedWeight
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
    if quant_info is not None and settings.embeddings is not None:
        raise NanoError("--embeddings applies when a float model is quantized; this model has its own codes")
    lengths = [n for n in settings.prefill_lengths if n > 1]  # length 1 is decode itself
    _rtn_specs(config, scheme, settings.embeddings)  # a block size that does not fit fails before any work

    with phase("load", f"{'initialising' if settings.random_init else 'loading'} {model_ref} as {scheme}"):
        params = _artifact_params(model_ref, settings, config, scheme, quant_info)
    integer = {name: w for name, w in params.items() if isinstance(w, QuantizedWeight)}

    kv_dtype = jnp.float16 if settings.kv_cache == "fp16" else jnp.float32

    def lowered_signatures():  # programs over abstract weights: shapes only, nothing allocated
        model = abstract_model(config)
        for n in [*lengths, 1]:
            yield export_signature(model, n, settings.max_tokens, kv_dtype=kv_dtype)

    with disk_full_as_error(where=out), scratch_directory(out) as tmp:
        graph = tmp / "graph.tflite"
        with phase("convert", f"converting {len(lengths) + 1} signatures ({', '.join(map(prefill_name, lengths))}, {DECODE})"):
            convert(lowered_signatures(), graph)
        tflite = tmp / "model.tflite"
        with phase("weights", f"writing {len(params)} weights ({scheme}) into the .tflite"):
            bind(graph, tflite, params, transposed=transposed, float16=scheme == "fp16")
            read_back_count = _check_read_back(tflite, integer) if integer else 0
        graph.unlink()
        convert_seconds = time.perf_counter() - start
        verification = None
        if settings.verify:
            with phase("verify", "verifying against JAX"):
                exact = scheme == "float32" and settings.kv_cache == "float32"  # else some rounding: perplexity
                verification = _verify(tflite, config, params, tokenizer, settings, exact=exact)
        final = tflite
        if out.suffix == ".litertlm":
            final = tmp / "model.litertlm"
            with phase("bundle", "bundling the .litertlm (tokenizer, LlmMetadata, executor metadata, provenance)"):
                bundle.build(tflite, final, tokenizer=tokenizer, config=config, max_tokens=settings.max_tokens,
                             provenance=_provenance(model_ref, config, scheme, quant_info, settings))
        final.replace(out)
    return {"out": str(out), "model": str(model_ref), "quant": scheme, "bytes": out.stat().st_size,
            "params": config.param_count, "signatures": [*map(prefill_name, lengths), DECODE],
            "max_tokens": settings.max_tokens, "int_weights": len(integer), "int_weights_read_back": read_back_count,
            "convert_seconds": round(convert_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": peak_rss_bytes(), "phases": phase, "verification": verification}


def _verify(tflite: Path, config, params: dict, tokenizer, settings: ExportSettings, *, exact: bool) -> dict:
    """The artifact against the JAX model on held-out text; NanoError (nothing is written) when they differ."""
    from export.cpu_emulation import EmulatedRunner
    from export.runtime import TFLiteRunner, quiet_native_stderr
    from export.verify import failure_line, verification_window, verify
    from nano.checkpoint import model_from_flat

    window, text = verification_window(tokenizer, min(settings.verify_tokens, settings.max_tokens), config.vocab_size)
    with quiet_native_stderr():
        # The JAX reference runs the very parameters written (integer codes included), not a copy.
        verification = verify(lambda: TFLiteRunner(tflite, threads=settings.threads),
                              lambda: model_from_flat(config, params), window, exact=exact,
                              ppl_tolerance=settings.ppl_tolerance,
                              emulated={cpu: functools.partial(EmulatedRunner, tflite, cpu, threads=settings.threads)
                                        for cpu in settings.verify_cpus})
    verification["text"] = text
    if not verification["ok"]:
        raise NanoError(failure_line(verification))
    return verification


def _provenance(model_ref, config, scheme, quant_info, settings) -> dict:
    return {"source": str(model_ref), "config_hash": config.hash, "config": config.to_dict(), "quant": scheme,
            "quant_method": (quant_info or {}).get("method", "rtn" if scheme.startswith("int") else "none"),
            "random_init": settings.random_init, "max_tokens": settings.max_tokens, "kv_cache": settings.kv_cache,
            "prefill_lengths": list(settings.prefill_lengths), "versions": _versions()}
