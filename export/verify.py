"""Does the artifact compute what the JAX model computes? One held-out window ([BOS] + text), its first half
written through the prefill signatures (padded last chunk included), its second half decoded token by token; the
decode logits are compared with the JAX model's on the same window.

- float32: max |Δlogit| ≤ 1e-3.
- fp16 / int8 / int4: perplexity over the decoded half within 2% of the JAX model of the device's arithmetic
  (`Decoder.as_device`: XNNPACK rounds an integer layer's input to int8 per row at run time). Rounding noise differs
  token by token, so logits differ everywhere; what they predict of the text must not. The plain JAX model's
  perplexity (exact float activations) is reported beside it: the gap between the two is the price of int8
  activations on the device.
"""

from __future__ import annotations

import numpy as np

FLOAT_TOLERANCE = 1e-3
PPL_TOLERANCE = 0.02


def verification_window(tokenizer, length: int, vocab_size: int) -> tuple[np.ndarray, str]:
    """([BOS] + the held-out split's first `length - 1` tokens, its description); without a tokenizer (a random
    preset with no vocabulary file) fixed pseudo-random ids, which test the arithmetic just as well."""
    from nano.corpus import corpus_text

    if tokenizer is None:
        ids = np.random.default_rng(0).integers(0, vocab_size, length).astype(np.int32)
        return ids, f"{length} pseudo-random token ids"
    ids = tokenizer.encode(corpus_text("heldout", max_chars=16 * length))[:length - 1]
    return np.array([tokenizer.bos_id, *ids], np.int32), f"{length} held-out tokens"


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """nano.scoring.nll per decoded position, a row at a time (all rows of a 262,144-way vocabulary at once would
    be gigabytes)."""
    from nano.scoring import nll

    return np.array([float(nll(row, target)) for row, target in zip(logits, targets)])


def _head(model, hidden, rows: int = 32768) -> np.ndarray:
    """model.head(hidden) a vocabulary chunk at a time: an integer table is dequantized `rows` rows at a time,
    never whole (a Nano-2 table in float32 is 2.7 GB, and dequantizing it takes three such arrays)."""
    from nano.quant import QuantizedWeight

    table = model.embedder.embedding.get_value()
    chunks = []
    for start in range(0, table.shape[0], rows):
        part = slice(start, start + rows)
        rows_of = (QuantizedWeight(table.codes[part], table.scales[part], table.spec)
                   if isinstance(table, QuantizedWeight) else table[part])
        chunks.append(np.asarray(model.head(hidden, embedding=rows_of), np.float32))
    return np.concatenate(chunks, axis=-1)


def verify(open_runner, build_model, window: np.ndarray, *, exact: bool, ppl_tolerance: float = PPL_TOLERANCE,
           emulated: dict | None = None) -> dict:
    """Compare the artifact (`open_runner()` → export.runtime.TFLiteRunner) with the JAX model (`build_model()`) on
    `window`; the result carries `ok`. One after the other, so the two never hold their weights at once.
    `emulated` ({cpu: open_runner}, export.cpu_emulation) runs the same window as those CPUs would: each is held to
    the same criterion against the same reference (result["cpus"]); `ok` then needs them all, `ok_here` is this
    CPU's alone."""
    import jax.numpy as jnp

    half = len(window) // 2

    def decoded(open_) -> tuple[np.ndarray, list[str] | None]:
        runner = open_()
        runner.prefill(window[:half])
        got = np.stack([runner.decode(int(window[p]), p) for p in range(half, len(window) - 1)])
        features = getattr(runner, "features", None)  # an emulated CPU's instruction sets, as its CPUID tells
        del runner
        return got, features

    got, _ = decoded(open_runner)
    got_on = {cpu: decoded(open_) for cpu, open_ in (emulated or {}).items()}
    model = build_model()
    targets = window[half + 1:]

    def perplexity_of(logits) -> float:
        return float(np.exp(_nll(logits, targets).mean()))

    def jax_logits(as_device: bool) -> np.ndarray:  # predicting window[half+1:]
        model.as_device = as_device
        hidden, _ = model(jnp.asarray(window[None]), return_hidden=True)
        return _head(model, hidden[:, half:len(window) - 1])[0]

    want = jax_logits(False)
    ppl_jax = perplexity_of(want)
    result = {"tokens": len(window), "prefilled": half, "decoded": len(targets), "ppl_jax": ppl_jax}
    if not exact:  # the reference is the device's arithmetic
        want = jax_logits(True)
        result["ppl_device"] = perplexity_of(want)
    del model
    reference = result.get("ppl_device", ppl_jax)

    def compared(logits) -> dict:
        figures = {"ppl_artifact": perplexity_of(logits), "max_abs_logit_diff": float(np.abs(logits - want).max()),
                   "top1_agreement": float(np.mean(logits.argmax(-1) == want.argmax(-1)))}
        figures["ppl_ratio"] = figures["ppl_artifact"] / reference
        figures["ok"] = (figures["max_abs_logit_diff"] <= FLOAT_TOLERANCE if exact
                         else abs(figures["ppl_ratio"] - 1) <= ppl_tolerance)
        return figures

    result.update(compared(got))
    if exact:
        result["criterion"] = f"max |Δlogit| ≤ {FLOAT_TOLERANCE}"
    else:
        result["criterion"] = f"perplexity within {ppl_tolerance:.1%} of the device model's"
        result["tolerance"] = ppl_tolerance
    if got_on:
        result["cpus"] = {cpu: {**compared(logits), "features": features}
                          for cpu, (logits, features) in got_on.items()}
        result["ok_here"] = result["ok"]
        result["ok"] = result["ok"] and all(c["ok"] for c in result["cpus"].values())
    return result


def failure_line(result: dict) -> str:
    """The first comparison that failed: this CPU's, else an emulated CPU's."""
    here = {**result, "ok": result.get("ok_here", result["ok"])}
    where, failed = next((where, c) for where, c in [("", here), *((f" on the emulated {cpu} CPU", c)
                                                                for cpu, c in result.get("cpus", {}).items())]
                         if not c["ok"])
    if result["criterion"].startswith("max"):
        return (f"verification failed{where}: max |Δlogit| {failed['max_abs_logit_diff']:.2e} against the JAX "
                f"model exceeds {FLOAT_TOLERANCE:g}")
    return (f"verification failed{where}: perplexity through the artifact {failed['ppl_artifact']:.4f} vs "
            f"{result['ppl_device']:.4f} from the JAX model of the device's arithmetic "
            f"({100 * (failed['ppl_ratio'] - 1):+.2f}%, limit ±{100 * result['tolerance']:g}%: --ppl-tolerance; "
            f"the plain JAX model gives {result['ppl_jax']:.4f})")
