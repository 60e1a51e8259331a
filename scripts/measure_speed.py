#!/usr/bin/env python3
"""Forward and generation speed of a model on this machine (the figures in the foundation issue's note).

    .venv/bin/python scripts/measure_speed.py gemma3-270m --dtype float32 --batch 4 --length 512

Forward: a jitted full-sequence pass of [batch, length] tokens, compile excluded, best of --repeats.
Generation: `nano generate`'s own decode loop (Generator.stream), greedy, tokens after the first.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nano.resolve import load_model
from nano.sampling import Generator, SamplingConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, _ = load_model(args.model, dtype=getattr(jnp, args.dtype))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (args.batch, args.length))
    forward(state, tokens).block_until_ready()  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward(state, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    forward_rate = args.batch * args.length / min(times)

    generator = Generator(model, SamplingConfig(temperature=0))
    prompt = [2] + tokens[0, :16].tolist()
    list(generator.stream(prompt, max_new_tokens=4))  # compile
    stamps = [time.perf_counter() for _ in generator.stream(prompt, max_new_tokens=args.new_tokens)]
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "length": args.length,
                      "forward_tokens_per_s": round(forward_rate, 1),
                      "generate_tokens_per_s": round(decode_rate, 2), "devices": str(jax.devices())}))


if __name__ == "__main__":
    main()
