"""Perplexity through an exported .tflite, with the `nano perplexity` protocol: the text cut into windows of
BOS + (window - 1) tokens, every token fed through the artifact's `decode` signature and scored on its logits.

    python scripts/artifact_perplexity.py ARTIFACT.tflite SOURCE_MODEL [--text FILE] [--window 512] [--threads N]

SOURCE_MODEL gives the tokenizer (and `nano perplexity SOURCE_MODEL --text FILE` the JAX figure to compare with).
Without --text it scores the 40,000 held-out characters `nano quantize` reports on (9,763 tokens for the teacher).
"""

import argparse
import time

import numpy as np

from export.runtime import LiteRTLM
from nano.models import load_model
from nano.perplexity import make_windows
from quantize.run import eval_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("model")
    parser.add_argument("--text", default=None)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    _, tokenizer = load_model(args.model)
    text, source = eval_text(args.text)
    tokens, weights = make_windows(tokenizer.encode(text), window=args.window, bos_id=tokenizer.bos_id,
                                   pad_id=tokenizer.pad_id)
    runner = LiteRTLM(args.artifact, threads=args.threads)
    nll, n, start = 0.0, 0, time.perf_counter()
    for row, scored in zip(tokens, weights):
        for p in range(int(scored.sum())):  # positions restart at 0: each window is a fresh context
            logits = runner.decode(int(row[p]), p).astype(np.float64)
            top = logits.max()
            nll += top + np.log(np.exp(logits - top).sum()) - logits[row[p + 1]]
            n += 1
    print(f"{args.artifact}: perplexity {np.exp(nll / n):.4f} on {n:,} tokens of {source} "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
