"""`nano bench` as a library call: speed, memory and (with a text) perplexity of an exported artifact.

Two backends run the same file:
- `litert`: ai-edge-litert's CompiledModel through export.runtime.LiteRTLM (XNNPACK, the KV cache updated in
  place, prompts split into the file's prefill signatures as the engine splits them);
- `litert-lm`: the LiteRT-LM engine itself (`litert_lm.Benchmark`, a .litertlm only), what an app runs.

Each figure is the median over `repeats` runs. Perplexity feeds every token through `decode` with the
`nano perplexity` protocol (windows of BOS + window - 1 tokens).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from export.run import peak_rss_bytes
from nano.errors import NanoError

BACKENDS = ("litert", "litert-lm")


def _section(path: Path, kind: str) -> bytes:
    """The bytes of a .litertlm's first section of `kind` ('TFLiteModel', 'SP_Tokenizer', ...)."""
    from litert_lm_builder import litertlm_core
    from litert_lm_builder import litertlm_peek as peek

    sections = peek.read_litertlm_header(str(path), io.StringIO()).SectionMetadata()
    with open(path, "rb") as f:
        for i in range(sections.ObjectsLength()):
            section = sections.Objects(i)
            if litertlm_core.any_section_data_type_to_string(section.DataType()) == kind:
                f.seek(section.BeginOffset())
                return f.read(section.EndOffset() - section.BeginOffset())
    raise NanoError(f"{path} holds no {kind} section")


def tflite_of(path: Path, tmp: Path) -> Path:
    """The .tflite itself, or the TFLite section of a .litertlm written to `tmp`."""
    if path.suffix != ".litertlm":
        return path
    out = tmp / "model.tflite"
    out.write_bytes(_section(path, "TFLiteModel"))
    return out


def tokenizer_of(path: Path, model: str | None):
    """The bundle's own SentencePiece tokenizer, or MODEL's for a bare .tflite."""
    from nano.tokenizer import Tokenizer

    if model is not None:
        from nano.checkpoint import TOKENIZER_FILE
        from nano.models import resolve_model_dir

        return Tokenizer.load(resolve_model_dir(model) / TOKENIZER_FILE)
    if path.suffix == ".litertlm":
        return Tokenizer(_section(path, "SP_Tokenizer"))
    raise NanoError("a bare .tflite carries no tokenizer: pass --model (the model it was exported from)")


def artifact_perplexity(runner, tokenizer, text: str, *, window: int = 512) -> dict:
    """The `nano perplexity` protocol through the artifact: every token fed through decode, scored on its logits."""
    from export.verify import token_nll
    from nano.perplexity import make_windows

    window = min(window, runner.max_tokens)
    tokens, weights = make_windows(tokenizer.encode(text), window=window, bos_id=tokenizer.bos_id,
                                   pad_id=tokenizer.pad_id)
    nll = [token_nll(runner.decode(int(row[p]), p), int(row[p + 1]))
           for row, scored in zip(tokens, weights)
           for p in range(int(scored.sum()))]  # positions restart at 0: each window is a fresh context
    return {"ppl": float(np.exp(np.mean(nll))), "ppl_tokens": len(nll), "ppl_window": window}


def _time_litert(runner, prefill_tokens, decode_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, runner.vocab_size, max(prefill_tokens) + decode_tokens + 1).tolist()
    prefill = {}
    for n in prefill_tokens:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.prefill(ids[:n])
            times.append(time.perf_counter() - start)
        prefill[str(n)] = n / statistics.median(times)
    decode, first = [], []
    for _ in range(repeats):
        n = prefill_tokens[0]
        start = time.perf_counter()
        runner.prefill(ids[:n])
        runner.decode(ids[n], n)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(1, decode_tokens):
            runner.decode(ids[n + i], n + i)
        decode.append((decode_tokens - 1) / (time.perf_counter() - start))
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": statistics.median(decode),
            "time_to_first_token_s": statistics.median(first)}


def _time_litert_lm(path: Path, threads: int, prefill_tokens, decode_tokens: int, repeats: int, cache: Path) -> dict:
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    prefill, decode, first, load = {}, [], [], []
    for n in prefill_tokens:
        runs = [litert_lm.Benchmark(str(path), backend=litert_lm.Backend.CPU(thread_count=threads),
                                    prefill_tokens=n, decode_tokens=decode_tokens, cache_dir=str(cache)).run()
                for _ in range(repeats)]
        prefill[str(n)] = statistics.median(r.last_prefill_tokens_per_second for r in runs)
        decode += [r.last_decode_tokens_per_second for r in runs]
        first += [r.time_to_first_token_in_second for r in runs]
        load += [r.init_time_in_second for r in runs]
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": statistics.median(decode),
            "time_to_first_token_s": statistics.median(first), "load_s": statistics.median(load)}


def bench(artifact: str | Path, *, backend: str = "litert", threads: int | None = None,
          prefill_tokens: tuple[int, ...] = (128, 512), decode_tokens: int = 128, repeats: int = 3,
          text: str | None = None, model: str | None = None) -> dict:
    import os

    from export.runtime import LiteRTLM, quiet_native_stderr

    path = Path(artifact)
    if not path.is_file():
        raise NanoError(f"{path} does not exist or is not a file")
    if path.suffix not in (".tflite", ".litertlm"):
        raise NanoError(f"{path} is neither a .tflite nor a .litertlm")
    if backend not in BACKENDS:
        raise NanoError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "litert-lm" and path.suffix != ".litertlm":
        raise NanoError("the litert-lm backend runs a .litertlm bundle; this is a bare .tflite")
    if repeats < 1 or decode_tokens < 2 or not prefill_tokens or min(prefill_tokens) < 1:
        raise NanoError("--repeats must be ≥ 1, --decode-tokens ≥ 2 and prefill lengths ≥ 1")
    threads = threads or os.cpu_count() or 1
    result = {"artifact": str(path), "backend": backend, "threads": threads, "file_bytes": path.stat().st_size,
              "decode_tokens": decode_tokens, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp, quiet_native_stderr():
        tmp = Path(tmp)
        start = time.perf_counter()
        runner = LiteRTLM(tflite_of(path, tmp), threads=threads)
        load = time.perf_counter() - start
        longest = max(prefill_tokens) + decode_tokens + 1
        if longest > runner.max_tokens:
            raise NanoError(f"prefill {max(prefill_tokens)} + decode {decode_tokens} tokens exceed the artifact's "
                            f"context of {runner.max_tokens}")
        if backend == "litert":
            result.update(_time_litert(runner, sorted(prefill_tokens), decode_tokens, repeats), load_s=load)
        if text is not None:
            result.update(artifact_perplexity(runner, tokenizer_of(path, model), text))
        del runner
        if backend == "litert-lm":
            result.update(_time_litert_lm(path, threads, sorted(prefill_tokens), decode_tokens, repeats, tmp))
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
