"""`nano-export` (also `nano export`): the command-line face of export.run."""

from __future__ import annotations

import json

import click

from cli.common import CONTEXT, Command
from export.settings import KV_CACHES, QUANTS, ExportSettings, parse_lengths
from nano.quant_scheme import EMBEDDINGS

DEFAULTS = ExportSettings()


@click.command("export", cls=Command, context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The artifact: FILE.litertlm (for the LiteRT-LM engine) or FILE.tflite.")
@click.option("--quant", type=click.Choice(QUANTS), default=None,
              help="Weight format. Default: a quantized model keeps its own codes (e.g. int4-b32 from `nano "
                   "quantize`), a float model exports float32. int8/int4 on a float model round to nearest.")
@click.option("--embeddings", type=click.Choice(EMBEDDINGS), default=None,
              help="With --quant int8/int4 on a float model: the embedding table (shared with the output head). "
                   "Default: the scheme's bits (int4 for int4-b32/b128, 4× smaller than float32).")
@click.option("--prefill-lengths", default=",".join(map(str, DEFAULTS.prefill_lengths)), show_default=True,
              help="Comma-separated prefill signature lengths (prefill_<N>). The engine runs a prompt as the longest "
                   "that fit, then the shortest that holds the rest, padded: add short ones (8,32,128,512) when "
                   "prompts are short (chat turns), at the cost of more calls for prompts just below 128.")
@click.option("--max-tokens", type=int, default=None,
              help="The most context an app may ask for: the LiteRT-LM engine chooses the context when it loads the "
                   "bundle (its max_num_tokens; `nano bench --max-tokens`), up to this, which is also the bundle's "
                   "default. Default: 4096, or the model's own context if shorter.")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=DEFAULTS.kv_cache, show_default=True,
              help="How the KV cache is stored (attention computes in float32 either way): fp16 halves its memory.")
@click.option("--no-verify", is_flag=True, help="Skip running the artifact against the JAX model.")
@click.option("--ppl-tolerance", type=float, default=DEFAULTS.ppl_tolerance, show_default=True,
              help="How far an integer artifact's perplexity may be (a fraction) from the JAX model of the device's "
                   "arithmetic (XNNPACK rounds an integer layer's input to int8 per row at run time) before the "
                   "export is refused.")
@click.option("--random-init", is_flag=True, help="Export a preset with random weights (sizes with no checkpoint).")
@click.option("--verify-cpu", "verify_cpus", multiple=True, metavar="avx2|avx|MODEL",
              help="Also verify the artifact as a CPU of this kind runs it (repeatable): XNNPACK picks its int8 × int4 "
                   "kernels by the CPU's instruction sets, so passing here says nothing of the others. Runs it under "
                   "qemu-x86_64 -cpu (Debian's qemu-user), ~100× slower: avx2 is an AMD Zen 2 (AVX2, no AVX-512), "
                   "avx an Intel Sandy Bridge, or name any model of `qemu-x86_64 -cpu help`.")
@click.option("--threads", type=int, default=None, help="CPU threads for verification (default: all).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_cmd(model, out, quant, embeddings, prefill_lengths, max_tokens, kv_cache, no_verify, ppl_tolerance,
               verify_cpus, random_init, threads, force, as_json):
    """Export MODEL (a model directory, the embedded teacher's name, or with --random-init a preset) to LiteRT.

    \b
    nano-export gemma3-270m --out teacher.litertlm
    nano-export runs/q/gptq --out teacher-int4.litertlm            # GPTQ's int4 codes, unchanged
    nano-export nano-micro --random-init --quant int4-b32 --out micro.litertlm  # random weights
    nano-export runs/q/gptq --max-tokens 8192 --out t.litertlm   # the engine may then load it at any context ≤ 8192
    nano-export runs/q/gptq --out t.litertlm --verify-cpu avx2  # verified here and on an emulated AVX2 CPU

    The .tflite holds signatures prefill_<N> and decode with the KV cache in and out; the .litertlm adds the
    tokenizer and the engine's metadata. Unless --no-verify, the artifact runs on held-out text and must match
    the JAX model (float32: |Δlogit| ≤ 1e-3; int8/int4/fp16: perplexity within --ppl-tolerance of the JAX model
    of the device's arithmetic, `nano perplexity --as-device`); otherwise nothing is written.
    """
    from export.run import export
    from export.runtime import quiet_native_teardown

    quiet_native_teardown()  # under `nano export` as under `nano-export`
    settings = ExportSettings(quant=quant, embeddings=embeddings, prefill_lengths=parse_lengths(prefill_lengths),
                              max_tokens=max_tokens, kv_cache=kv_cache, verify=not no_verify,
                              ppl_tolerance=ppl_tolerance,
                              random_init=random_init, threads=threads, verify_cpus=tuple(verify_cpus))
    result = export(model, out, settings, force=force)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} → {result['out']} ({result['quant']})", show_header=False)
    table.add_row("size", f"{result['bytes'] / 2**20:,.1f} MiB")
    table.add_row("signatures", ", ".join(result["signatures"]) + f" (context {result['max_tokens']:,})")
    if result["int_weights"]:
        table.add_row("integer weights", f"{result['int_weights']} (read back from the file: all)")
    v = result["verification"]
    if v:
        versus = (f"the device model {v['ppl_device']:.4f} (plain JAX {v['ppl_jax']:.4f})" if "ppl_device" in v
                  else f"JAX {v['ppl_jax']:.4f}")
        table.add_row("verified", f"{v['criterion']}: perplexity {v['ppl_artifact']:.4f} vs {versus}, max |Δlogit| "
                                  f"{v['max_abs_logit_diff']:.2e}, top-1 {v['top1_agreement']:.3f} "
                                  f"({v['decoded']} tokens decoded after {v['prefilled']} prefilled)")
        for cpu, c in v.get("cpus", {}).items():
            table.add_row(f"verified as {cpu}", f"perplexity {c['ppl_artifact']:.4f}, max |Δlogit| "
                                                f"{c['max_abs_logit_diff']:.2e}, top-1 {c['top1_agreement']:.3f} "
                                                f"(emulated, up to {_widest_isa(c['features'])})")
    else:
        table.add_row("verified", "no (--no-verify)")
    table.add_row("time", f"{result['seconds']:.1f} s (conversion {result['convert_seconds']:.1f} s)")
    table.add_row("peak memory", f"{result['peak_rss_bytes'] / 2**30:.2f} GiB")
    Console().print(table)


def _widest_isa(features: list[str]) -> str:
    """The widest x86 vector extension among an emulated CPU's instruction sets (what tells it from this one)."""
    return next((name for flag, name in (("AVX512F", "AVX-512"), ("AVX2", "AVX2"), ("AVX", "AVX"))
                 if flag in features), "SSE")


def main() -> None:
    export_cmd(prog_name="nano-export")
