#!/usr/bin/env python3
"""How far the device model's perplexity moves by noise alone (the figures in docs/export.md).

The int8 rounding of each integer layer's input (`Decoder.as_device`) is a noise whose realization changes with
any float difference upstream. This scores a quantized model with `--as-device` several times, each with one
RMSNorm scaled by 1 + k * step (far below what changes the plain model), and prints the spread: what a comparison
of the device model with an artifact on this much text can resolve.

    .venv/bin/nano quantize gemma3-270m --method rtn --embeddings int4 --no-eval --out runs/q/rtn
    .venv/bin/nano corpus --split heldout --max-chars 16000 --out heldout.txt
    .venv/bin/python scripts/device_noise.py runs/q/rtn --text heldout.txt --realizations 4
"""

from __future__ import annotations

import argparse
import statistics

from nano.checkpoint import flat_params, model_from_flat
from nano.files import read_text
from nano.perplexity import perplexity
from nano.resolve import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a quantized model directory")
    parser.add_argument("--text", required=True)
    parser.add_argument("--realizations", type=int, default=4)
    parser.add_argument("--step", type=float, default=1e-6, help="relative change of the norm per realization")
    parser.add_argument("--norm", default="layers.0.attn_norm.scale")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    text = read_text(args.text)
    params = flat_params(model)
    base = params[args.norm]
    plain = perplexity(model, tokenizer, text)
    print(f"plain: perplexity {plain.ppl:.4f} over {plain.tokens:,} tokens")
    figures = []
    for k in range(args.realizations):
        perturbed = model_from_flat(model.config, {**params, args.norm: base * (1 + k * args.step)})
        perturbed.as_device = True
        figures.append(perplexity(perturbed, tokenizer, text).ppl)
        print(f"device model, {args.norm} x (1 + {k} * {args.step:g}): perplexity {figures[-1]:.4f}", flush=True)
    if len(figures) > 1:
        mean = statistics.mean(figures)
        print(f"device model: mean {mean:.4f}, std {100 * statistics.stdev(figures) / mean:.2f}%, "
              f"range {min(figures):.4f}-{max(figures):.4f}")


if __name__ == "__main__":
    main()
