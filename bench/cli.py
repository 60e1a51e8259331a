"""`nano bench`: the command-line face of bench.run."""

from __future__ import annotations

import json

import click

from bench.run import BACKENDS


@click.command("bench")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(BACKENDS), default="litert", show_default=True,
              help="litert: ai-edge-litert's CompiledModel (XNNPACK); litert-lm: the LiteRT-LM engine (.litertlm).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all).")
@click.option("--prefill-tokens", default="128,512", show_default=True, help="Comma-separated prompt lengths timed.")
@click.option("--decode-tokens", default=128, show_default=True, help="Tokens decoded per run.")
@click.option("--repeats", default=3, show_default=True, help="Runs per figure (the median is reported).")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Also measure perplexity through the artifact on this text (the nano perplexity protocol).")
@click.option("--model", default=None, help="The source model, for a bare .tflite's tokenizer (a .litertlm has one).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def bench_cmd(artifact, backend, threads, prefill_tokens, decode_tokens, repeats, text, model, as_json):
    """Time an exported ARTIFACT (.tflite or .litertlm): load, time to first token, prefill and decode tokens/s,
    peak RSS, file size; with --text, perplexity through the artifact.

    \b
    nano bench runs/export/teacher-int4-b32.litertlm
    nano bench runs/export/teacher-int4-b32.litertlm --backend litert-lm --json
    nano bench t.tflite --model gemma3-270m --text heldout.txt
    """
    from bench.run import bench
    from export.settings import parse_lengths
    from nano.cli import _read_text

    result = bench(artifact, backend=backend, threads=threads, prefill_tokens=parse_lengths(prefill_tokens),
                   decode_tokens=decode_tokens, repeats=repeats, text=_read_text(text) if text else None, model=model)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['artifact']} ({result['backend']}, {result['threads']} threads)", show_header=False)
    table.add_row("file size", f"{result['file_bytes'] / 2**20:,.1f} MiB")
    table.add_row("load", f"{result['load_s']:.2f} s")
    table.add_row("time to first token", f"{result['time_to_first_token_s'] * 1000:.0f} ms")
    for n, rate in result["prefill_tokens_per_s"].items():
        table.add_row(f"prefill {n} tokens", f"{rate:,.0f} tokens/s")
    table.add_row(f"decode ({result['decode_tokens']} tokens)", f"{result['decode_tokens_per_s']:,.1f} tokens/s")
    if "ppl" in result:
        table.add_row("perplexity", f"{result['ppl']:.4f} over {result['ppl_tokens']:,} tokens")
    table.add_row("peak memory", f"{result['peak_rss_bytes'] / 2**30:.2f} GiB")
    Console().print(table)
