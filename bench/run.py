"""`nano bench` as a library call: speed, memory and (with a text) perplexity of an exported artifact.

Two backends run the same file:
- `litert`: ai-edge-litert's CompiledModel through export.runtime.TFLiteRunner (XNNPACK, the KV cache updated in
  place, prompts split into the file's prefill signatures as the engine splits them);
- `litert-lm`: the LiteRT-LM engine itself (its own benchmark, after a warm-up generation; a .litertlm only), what
  an app runs.
`--delegate PATH` runs the litert backend through an external delegate (bench.delegate).

Each figure is the median over `repeats` runs; with a GGUF, llama.cpp (bench.peer) runs between ours, alternating,
and the result holds its figures under "peer" and ours / its throughput under "ratios". bench.bandwidth adds the
bytes each decoded token reads and the decode rate the machine's memory bandwidth allows. Perplexity feeds every
token through `decode` with the `nano perplexity` protocol (windows of BOS + window - 1 tokens).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engine import engine_benchmark
from bench.peer import WARMUP_TOKENS
from export.bundle import read_provenance
from export.integrity import check_artifact
from export.runtime import quiet_native_stderr
from nano.errors import NanoError
from nano.checkpoint import is_model_dir
from nano.files import peak_rss_bytes
from nano.resolve import DEFAULT_TEACHER, teacher_gguf_path

BACKENDS = ("litert", "litert-lm")
PERPLEXITY_WINDOW = 512  # `nano perplexity`'s default, cut to the artifact's context
QUALITY_KEYS = ("ppl", "ppl_tokens", "ppl_window", "bits_per_byte")  # what a text measures, beside the speeds


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
        from nano.resolve import resolve_model_dir

        return Tokenizer.load(resolve_model_dir(model) / TOKENIZER_FILE)
    if path.suffix == ".litertlm":
        return Tokenizer(_section(path, "SP_Tokenizer"))
    raise NanoError("a bare .tflite carries no tokenizer: pass --model (the model it was exported from)")


def open_runner(tflite: Path, *, threads: int, delegate: str | None = None, delegate_options: dict | None = None):
    """The Python runner for a .tflite: on the CPU (XNNPACK, caches in place), or through an external delegate."""
    if delegate is None:
        from export.runtime import TFLiteRunner

        return TFLiteRunner(tflite, threads=threads)
    from bench.delegate import DelegatedRunner

    return DelegatedRunner(tflite, delegate=delegate, options=delegate_options, threads=threads)


def artifact_perplexity(runner, tokenizer, text: str, *, window: int = PERPLEXITY_WINDOW) -> dict:
    """The `nano perplexity` protocol through the artifact: every token fed through decode, scored on its logits
    (positions restart at 0: each window is a fresh context)."""
    from nano.perplexity import runtime_perplexity

    def decode_window(row):
        return (runner.decode(int(token), p) for p, token in enumerate(row[:-1]))

    return runtime_perplexity(tokenizer.encode(text), text, decode_window, window=min(window, runner.max_tokens),
                              bos_id=tokenizer.bos_id)


def _round_litert(runner, ids: list[int], prefill_tokens, decode_tokens: int) -> dict:
    """One run of every figure through the Python runner: each prefill length from an empty context, then the time
    to the first token and decode after the first length."""
    runner.prefill(ids[:WARMUP_TOKENS])  # the first call allocates: timed warm, as bench.peer times llama.cpp
    prefill = {}
    for n in prefill_tokens:
        start = time.perf_counter()
        runner.prefill(ids[:n])
        prefill[str(n)] = n / (time.perf_counter() - start)
    n = prefill_tokens[0]
    start = time.perf_counter()
    runner.prefill(ids[:n])
    runner.decode(ids[n], n)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, decode_tokens):
        runner.decode(ids[n + i], n + i)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": (decode_tokens - 1) / (time.perf_counter() - start),
            "time_to_first_token_s": first}


def _round_litert_lm(path: Path, threads: int, prefill_tokens, decode_tokens: int, cache: Path,
                     context: int | None = None) -> dict:
    """One run of every figure in the LiteRT-LM engine (its own benchmark: a prompt of n tokens, then a fixed count
    of decoded ones), at `context` tokens (None: the bundle's own), each length in a freshly loaded engine."""
    runs = {n: engine_benchmark(path, threads, n, decode_tokens, cache, context)[-1] for n in prefill_tokens}
    first = runs[prefill_tokens[0]]
    return {"prefill_tokens_per_s": {str(n): r.last_prefill_tokens_per_second for n, r in runs.items()},
            "decode_tokens_per_s": first.last_decode_tokens_per_second,
            "time_to_first_token_s": first.time_to_first_token_in_second, "load_s": first.init_time_in_second}


def _round_gguf(gguf: Path, threads: int, prefill_tokens, decode_tokens: int, text: Path | None = None,
                window: int = 512) -> dict:
    """One run of llama.cpp (bench.peer) in a child process; with `text`, its perplexity too."""
    import json
    import subprocess
    import sys

    _need_llama_cpp()
    command = [sys.executable, "-m", "bench.peer", str(gguf), "--threads", str(threads),
               "--prefill-tokens", ",".join(map(str, prefill_tokens)), "--decode-tokens", str(decode_tokens)]
    if text is not None:
        command += ["--text", str(text), "--window", str(window)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise NanoError(f"llama.cpp failed on {gguf}: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _need_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise NanoError("--vs-gguf needs llama.cpp's bindings: run `make peer` (builds llama-cpp-python, ~7 min)")


def _median(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds."""
    out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "prefill_tokens_per_s"}
    out["prefill_tokens_per_s"] = {n: statistics.median(r["prefill_tokens_per_s"][n] for r in rounds)
                                   for n in rounds[0]["prefill_tokens_per_s"]}
    return out


def ratios(ours: dict, peer: dict) -> dict:
    """Ours over the peer's throughput (above 1: we are faster), each prefill length and decode."""
    out = {f"prefill_{n}": rate / peer["prefill_tokens_per_s"][n] for n, rate in ours["prefill_tokens_per_s"].items()}
    out["decode"] = ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
    return out


def _check(paths: list[Path], backend: str, delegate, repeats: int, decode_tokens: int, prefill_tokens) -> None:
    if not paths:
        raise NanoError("no artifact to bench")
    for path in paths:
        if not path.is_file():
            raise NanoError(f"{path} does not exist or is not a file")
        if path.suffix not in (".tflite", ".litertlm"):
            raise NanoError(f"{path} is neither a .tflite nor a .litertlm")
        if backend == "litert-lm" and path.suffix != ".litertlm":
            raise NanoError(f"the litert-lm backend runs a .litertlm bundle; {path} is a bare .tflite")
        check_artifact(path)  # a damaged or altered file: one line here, never a signal in the runtime
    if backend not in BACKENDS:
        raise NanoError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "litert-lm" and delegate is not None:
        raise NanoError("--delegate runs through ai-edge-litert: use it with --backend litert")
    if repeats < 1 or decode_tokens < 2 or not prefill_tokens or min(prefill_tokens) < 1:
        raise NanoError("--repeats must be ≥ 1, --decode-tokens ≥ 2 and prefill lengths ≥ 1")


class _Subject:
    """One artifact under test: its .tflite, its Python runner while the litert backend times it, its rounds, and
    the context it runs at (`context`: chosen at load, in the engine)."""

    def __init__(self, path: Path, tmp: Path, *, threads: int, delegate, delegate_options, longest: int, limit: str,
                 context: int | None):
        self.path, self.tflite, self.rounds = path, tflite_of(path, tmp), []
        self.result = {"artifact": str(path), "file_bytes": path.stat().st_size}
        start = time.perf_counter()
        self.runner = open_runner(self.tflite, threads=threads, delegate=delegate, delegate_options=delegate_options)
        self.load = time.perf_counter() - start
        self.result.update(getattr(self.runner, "placement", {}))
        slots = self.runner.max_tokens  # the file's own shapes, which the Python runner runs
        if context is not None:
            if not self.runner.context_at_load:
                raise NanoError(f"{path.name} has its context fixed at export (no `mask` input): --max-tokens needs "
                                "an artifact exported by this nano (nano-export --max-tokens N: the most an app asks)")
            if context >= slots:
                raise NanoError(f"--max-tokens {context}: {path.name} holds at most {slots - 1} tokens (export it "
                                "with a larger nano-export --max-tokens)")
        elif path.suffix == ".litertlm" and self.runner.context_at_load:
            context = read_provenance(path).get("max_tokens")  # the engine's default: the bundle's own
        self.context = context or slots
        self.result["context"] = self.context
        if longest > self.context:
            raise NanoError(f"{limit} exceed the artifact's context of {self.context}")
        self.ids = np.random.default_rng(0).integers(3, self.runner.vocab_size, longest).tolist()


def bench(artifact: str | Path, **options) -> dict:
    """`bench_many` of one artifact: its result."""
    return bench_many([artifact], **options)[0]


def bench_many(artifacts: list[str | Path], *, backend: str = "litert", threads: int | None = None,
               delegate: str | None = None, delegate_options: dict[str, str] | None = None,
               prefill_tokens: tuple[int, ...] = (128, 512), decode_tokens: int = 128, repeats: int = 3,
               text: str | None = None, model: str | None = None, vs_gguf: str | None = None,
               peer_quant: str | None = None, max_tokens: int | None = None,
               progress=lambda message: None) -> list[dict]:
    """Time each ARTIFACT in alternating rounds (each artifact once per round, then llama.cpp on `vs_gguf` when
    given), so that all see the same machine state, and report each one's medians; with `vs_gguf`, each result's
    ratios to llama.cpp. `vs_gguf` is a GGUF file, the embedded teacher's name (its shipped GGUF) or a model
    directory (exported to GGUF first); `peer_quant` has llama.cpp quantize it (bench.peer.peer_gguf).
    `max_tokens` is the context the engine loads the artifacts at (litert-lm only; default: each bundle's own).
    `progress` hears what runs."""
    import os

    from bench.bandwidth import decode_limit
    from bench.peer import PEER_QUANTS, peer_gguf

    paths = [Path(a) for a in artifacts]
    _check(paths, backend, delegate, repeats, decode_tokens, prefill_tokens)
    if max_tokens is not None and backend != "litert-lm":
        raise NanoError("--max-tokens chooses the context when the LiteRT-LM engine loads a bundle: use it with "
                        "--backend litert-lm (the Python runner runs the file's own shapes)")
    if peer_quant is not None and (vs_gguf is None or peer_quant not in PEER_QUANTS):
        raise NanoError(f"--peer-quant ({', '.join(PEER_QUANTS)}) quantizes the model --vs-gguf names, got "
                        f"{peer_quant!r} for {vs_gguf!r}")
    if vs_gguf == DEFAULT_TEACHER and peer_quant is None:
        vs_gguf = str(teacher_gguf_path())
    if vs_gguf is not None and not (Path(vs_gguf).is_file() or is_model_dir(vs_gguf) or vs_gguf == DEFAULT_TEACHER):
        raise NanoError(f"--vs-gguf {vs_gguf} does not exist or is neither a GGUF file nor a model directory")
    if vs_gguf is not None:
        _need_llama_cpp()
    threads = threads or os.cpu_count() or 1
    prefill_tokens = sorted(prefill_tokens)
    longest = max(prefill_tokens) + decode_tokens + 1
    peer, peer_quality = [], {}
    with tempfile.TemporaryDirectory() as tmp, quiet_native_stderr():
        tmp = Path(tmp)
        subjects = []
        for i, path in enumerate(paths):  # each in its own folder: two bundles' .tflite sections share a name
            (tmp / str(i)).mkdir()
            subjects.append(_Subject(path, tmp / str(i), threads=threads, delegate=delegate,
                                     delegate_options=delegate_options, longest=longest, context=max_tokens,
                                     limit=f"prefill {max(prefill_tokens)} + decode {decode_tokens} tokens"))
        window = min(PERPLEXITY_WINDOW, *(s.context for s in subjects))
        if vs_gguf is not None:
            progress(f"llama.cpp's GGUF of {vs_gguf}" + (f" as {peer_quant}" if peer_quant else ""))
            peer_path, peer_name = peer_gguf(vs_gguf, peer_quant, tmp, threads=threads)
            peer_file = {"engine": "llama.cpp", "gguf": peer_name, "file_bytes": peer_path.stat().st_size,
                         **({"peer_quant": peer_quant} if peer_quant else {})}
        peer_text = tmp / "text.txt" if text is not None else None
        if peer_text is not None:
            peer_text.write_text(text, encoding="utf-8")
        if text is not None:
            for s in subjects:
                progress(f"perplexity through {s.path.name}")
                s.result.update(artifact_perplexity(s.runner, tokenizer_of(s.path, model), text, window=window))
        if backend == "litert-lm":
            for s in subjects:
                s.runner = None  # the engine loads the bundle itself, each round
        for r in range(repeats):
            for s in subjects:
                progress(f"run {r + 1}/{repeats}: {s.path.name} ({backend})")
                s.rounds.append(_round_litert_lm(s.path, threads, prefill_tokens, decode_tokens, tmp, max_tokens)
                                if backend == "litert-lm" else
                                {**_round_litert(s.runner, s.ids, prefill_tokens, decode_tokens), "load_s": s.load})
            if vs_gguf is not None:  # the first llama.cpp run also scores the text, on the same windows
                progress(f"run {r + 1}/{repeats}: llama.cpp" + (" (and its perplexity)" if r == 0 and text else ""))
                figures = _round_gguf(peer_path, threads, prefill_tokens, decode_tokens,
                                      text=peer_text if r == 0 else None, window=window)
                peer_quality.update({k: figures.pop(k) for k in QUALITY_KEYS if k in figures})
                peer.append(figures)
        results = []
        for s in subjects:
            s.runner = None
            result = {**s.result, "backend": backend, "threads": threads, "decode_tokens": decode_tokens,
                      "repeats": repeats, **_median(s.rounds)}
            progress(f"memory bandwidth ({s.path.name})")
            engine_context = s.context if backend == "litert-lm" else None  # the Python runner keeps the file's
            result.update(decode_limit(s.tflite, result["decode_tokens_per_s"], threads, context=engine_context))
            results.append(result)
    for result in results:
        if peer:
            result["peer"] = {**peer_file, **_median(peer), **peer_quality}
            result["ratios"] = ratios(result, result["peer"])
        result["peak_rss_bytes"] = peak_rss_bytes()
    return results
