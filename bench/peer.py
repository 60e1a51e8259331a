"""llama.cpp on a GGUF, timed the way `nano bench` times an artifact: the peer of `nano bench --vs-gguf`.

One call of `python -m bench.peer GGUF ...` is one run: load, then every prefill length on a cleared cache, then
time to first token and decode after the first length; with --text, perplexity on it by the `nano perplexity`
protocol (llama.cpp's token ids are ours, tested against golden data); it prints one JSON object. `bench.run` starts it as a child
process between its own runs: llama.cpp's OpenMP threads keep spinning after each call, and in our process they
would steal the cores LiteRT's threads need; a child also gives llama.cpp its own peak RSS.

The bindings are the `peer` extra (`make peer` builds llama-cpp-python from source without AMX).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

WARMUP_TOKENS = 16  # llama-bench warms up too: the first call allocates compute buffers


def time_gguf(path: str, *, threads: int, prefill_tokens: list[int], decode_tokens: int) -> dict:
    from llama_cpp import Llama

    context = max(prefill_tokens) + decode_tokens + 1
    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=context, n_batch=max(prefill_tokens), n_ubatch=max(prefill_tokens),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), context).tolist()

    def restart():
        llm.reset()
        llm._ctx.kv_cache_clear()

    def next_token() -> int:  # greedy, as the LiteRT-LM engine's benchmark samples
        # The last token's logits from llama.cpp itself: without logits_all, `llm.scores` is never written (and has
        # only n_batch rows, too few once a decode runs past the longest prefill).
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.eval(ids[:WARMUP_TOKENS])
    prefill = {}
    for n in prefill_tokens:
        restart()
        start = time.perf_counter()
        llm.eval(ids[:n])
        prefill[str(n)] = n / (time.perf_counter() - start)
    restart()
    start = time.perf_counter()
    llm.eval(ids[:prefill_tokens[0]])
    token = next_token()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens - 1):
        llm.eval([token])
        token = next_token()
    decode = (decode_tokens - 1) / (time.perf_counter() - start)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "time_to_first_token_s": first,
            "load_s": load}


def gguf_perplexity(path: str, text: str, *, threads: int, window: int) -> dict:
    """Each window (BOS + window - 1 tokens) in one batch with logits at every position, scored as
    bench.run.artifact_perplexity scores the artifact (nano.perplexity.runtime_perplexity)."""
    from llama_cpp import Llama

    from nano.perplexity import runtime_perplexity

    llm = Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)

    def eval_window(row):
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(row.tolist())
        return (llm.scores[p] for p in range(len(row) - 1))

    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    return runtime_perplexity(ids, text, eval_window, window=window, bos_id=llm.token_bos())


PEER_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")  # llama.cpp's own 4-bit (k-quant and legacy) and 8-bit formats
_QUANTIZE = "import sys; from bench.peer import quantize_gguf; quantize_gguf(*sys.argv[1:4], threads=int(sys.argv[4]))"


def quantize_gguf(src: str, dst: str, quant: str, *, threads: int) -> None:
    """llama.cpp's own quantizer (what `llama-quantize SRC DST QUANT` runs) on a float GGUF."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src}")


def peer_gguf(vs_gguf: str, quant: str | None, tmp: Path, *, threads: int) -> tuple[Path, str]:
    """(the GGUF llama.cpp runs, its name in results) for `--vs-gguf X [--peer-quant Q]`: a GGUF file runs as it is;
    a model directory (or the embedded teacher's name with --peer-quant) is exported to a float32 GGUF under `tmp`.
    With `quant`, llama.cpp's own quantizer makes that (or the file) Q: the same float model as our int4, their
    4-bit beside ours. The quantizer runs in a child process, as every llama.cpp call here does."""
    import subprocess
    import sys

    from nano.errors import NanoError
    from nano.gguf_export import export_gguf

    if Path(vs_gguf).is_file():
        source, name = Path(vs_gguf), str(vs_gguf)
    else:
        source, name = export_gguf(vs_gguf, tmp / "peer-f32.gguf"), f"{vs_gguf} (f32 GGUF)"
    if quant is None:
        return source, name
    out = tmp / f"peer-{quant}.gguf"
    done = subprocess.run([sys.executable, "-c", _QUANTIZE, str(source), str(out), quant, str(threads)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise NanoError(f"llama.cpp could not quantize {vs_gguf} to {quant}: {lines[-1]}")
    return out, f"{vs_gguf} ({quant} by llama.cpp)"


def main() -> None:
    from nano.files import peak_rss_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prefill-tokens", required=True, help="comma-separated, the first is decode's prompt")
    parser.add_argument("--decode-tokens", type=int, required=True)
    parser.add_argument("--text", help="a text file: also its perplexity")
    parser.add_argument("--window", type=int, default=512, help="perplexity window")
    args = parser.parse_args()
    result = time_gguf(args.gguf, threads=args.threads, decode_tokens=args.decode_tokens,
                       prefill_tokens=[int(n) for n in args.prefill_tokens.split(",")])
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            result.update(gguf_perplexity(args.gguf, f.read(), threads=args.threads, window=args.window))
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
