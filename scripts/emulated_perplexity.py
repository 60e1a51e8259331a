#!/usr/bin/env python3
"""Perplexity and bits per byte through an artifact as another kind of CPU computes them (the figures in
docs/export.md): `nano bench --text`'s protocol, every token decoded by the artifact in a child under
qemu-x86_64 -cpu (export.cpu_emulation), to set beside `nano perplexity --as-device` of the same codes.
~100x slower than the CPU itself: 3,868 tokens of the embedded teacher take ~80 minutes on one core.

    .venv/bin/nano quantize gemma3-270m --method rtn --embeddings int4 --rotate 0 --no-eval --out runs/q/rtn
    .venv/bin/nano-export gemma3-270m --quant int4-b32 --max-tokens 1024 --out rtn.tflite
    .venv/bin/nano corpus --split heldout --max-chars 16000 --out heldout.txt
    .venv/bin/python scripts/emulated_perplexity.py rtn.tflite --model gemma3-270m --text heldout.txt --cpu avx2
    .venv/bin/nano perplexity runs/q/rtn --text heldout.txt --as-device
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.run import artifact_perplexity, tflite_of, tokenizer_of
from export.cpu_emulation import CPUS, EmulatedRunner
from nano.files import read_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="a .tflite or .litertlm")
    parser.add_argument("--text", required=True)
    parser.add_argument("--model", help="the source model, for a bare .tflite's tokenizer")
    parser.add_argument("--cpu", default="avx2", help=f"{', '.join(CPUS)} or a qemu-x86_64 CPU model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runner = EmulatedRunner(tflite_of(args.artifact, Path(tmp)), args.cpu, threads=args.threads)
        result = artifact_perplexity(runner, tokenizer_of(args.artifact, args.model), read_text(args.text),
                                     window=args.window)
        runner.close()
    print(json.dumps({"cpu": args.cpu, "features": runner.features, **result}))


if __name__ == "__main__":
    main()
