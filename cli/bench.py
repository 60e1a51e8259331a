"""`nano bench`: the command-line face of bench.run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bench.peer import PEER_QUANTS
from bench.run import BACKENDS
from cli.common import CONTEXT


@click.command("bench", context_settings=CONTEXT)
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(BACKENDS), default="litert", show_default=True,
              help="litert: ai-edge-litert's CompiledModel (XNNPACK); litert-lm: the LiteRT-LM engine (.litertlm).")
@click.option("--threads", type=int, default=None, help="CPU threads, for us and for llama.cpp (default: all).")
@click.option("--delegate", default=None, metavar="PATH",
              help="Run through this LiteRT external delegate library (libedgetpu.so.1, a GPU delegate, ...).")
@click.option("--delegate-option", "delegate_options", multiple=True, metavar="KEY=VALUE",
              help="An option for the delegate (repeatable), e.g. device=usb:0 for an Edge TPU.")
@click.option("--prefill-tokens", default="128,512", show_default=True, help="Comma-separated prompt lengths timed.")
@click.option("--decode-tokens", default=128, show_default=True, help="Tokens decoded per run.")
@click.option("--repeats", default=3, show_default=True, help="Runs per figure (the median is reported).")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Also measure perplexity through the artifact on this text (the nano perplexity protocol).")
@click.option("--model", default=None, help="The source model, for a bare .tflite's tokenizer (a .litertlm has one).")
@click.option("--vs-gguf", default=None, metavar="FILE|MODEL",
              help="Also run llama.cpp on this GGUF (or gemma3-270m: the embedded teacher's; or a model directory, "
                   "exported to GGUF first), alternating with ours, and report the ratios; needs `make peer`.")
@click.option("--peer-quant", type=click.Choice(PEER_QUANTS), default=None,
              help="Quantize the --vs-gguf model with llama.cpp's own quantizer first: the same float model, their "
                   "4-bit beside ours.")
@click.option("--max-tokens", type=int, default=None, metavar="N",
              help="The context the LiteRT-LM engine loads each bundle at (--backend litert-lm): any N below the "
                   "most its export allowed (nano-export --max-tokens). Default: the bundle's own.")
@click.option("--report", "report_dir", default=None, metavar="DIR", help="Write bench.md, bench.json, bench.png here.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object (a list of them for several artifacts).")
def bench_cmd(artifacts, backend, threads, delegate, delegate_options, prefill_tokens, decode_tokens, repeats, text,
              model, vs_gguf, peer_quant, max_tokens, report_dir, as_json):
    """Time exported ARTIFACTS (.tflite or .litertlm): load, time to first token, prefill and decode tokens/s,
    peak RSS, file size, and how close decode is to the memory-bandwidth limit; with --text, perplexity and bits
    per byte through the artifact; with --vs-gguf, llama.cpp on the same machine, threads and lengths. Several
    artifacts run in alternating rounds (each once per round), so their ratios are measured in one machine state.
    Every runtime is timed warm, after a first call that allocates (llama.cpp as llama-bench times it).

    \b
    nano bench runs/export/teacher-int4-b32.litertlm
    nano bench runs/export/teacher-int4-b32.litertlm --backend litert-lm --vs-gguf teacher.gguf --report out/
    nano bench student-int4.litertlm --backend litert-lm --vs-gguf runs/distill/kd/final --peer-quant Q4_K_M
    nano bench t.tflite --model gemma3-270m --text heldout.txt --json
    nano bench teacher.litertlm student.litertlm --backend litert-lm --report out/   # side by side
    nano bench teacher.litertlm --backend litert-lm --max-tokens 1024   # the same bundle at a 1,024-token context
    nano bench m.tflite --model M --delegate /usr/lib/libedgetpu.so.1 --delegate-option device=usb:0
    """
    from rich.console import Console

    from bench.run import bench_many
    from export.runtime import quiet_native_teardown
    from export.settings import parse_lengths
    from nano.files import read_text

    err = Console(stderr=True)
    quiet_native_teardown()
    with err.status("benchmarking") as status:
        results = bench_many(list(artifacts), backend=backend, threads=threads, delegate=delegate,
                             delegate_options=_options(delegate_options),
                             prefill_tokens=parse_lengths(prefill_tokens), decode_tokens=decode_tokens,
                             repeats=repeats, text=read_text(text) if text else None, model=model, vs_gguf=vs_gguf,
                             peer_quant=peer_quant, max_tokens=max_tokens,
                             progress=lambda message: status.update(f"benchmarking: {message}"))
    if report_dir is not None:
        from bench.report import write_report

        names = [Path(a).name for a in artifacts]
        if len(set(names)) != len(names):
            names = [str(a) for a in artifacts]
        for path in write_report(dict(zip(names, results)), report_dir):
            err.print(f"wrote {path}")
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    for result in results:
        Console().print(_table(result))


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--delegate-option")
        options[key] = value
    return options


def _table(result: dict):
    from rich.table import Table

    peer = result.get("peer")
    table = Table(title=f"{result['artifact']} ({result['backend']}, {result['threads']} threads, context "
                        f"{result['context']:,})",
                  caption=f"llama.cpp: {peer['gguf']}, in alternating runs" if peer else None)
    table.add_column("")
    table.add_column("ours", justify="right")
    if peer:
        table.add_column("llama.cpp", justify="right")
        table.add_column("ours / llama.cpp", justify="right")

    def row(label, key, fmt, ratio=None):
        cells = [label, fmt(result[key])]
        if peer:
            cells += [fmt(peer[key]), f"{ratio:.2f}×" if ratio is not None else ""]
        table.add_row(*cells)

    row("file size", "file_bytes", lambda v: f"{v / 2**20:,.1f} MiB")
    row("load", "load_s", lambda v: f"{v:.2f} s")
    row("time to first token", "time_to_first_token_s", lambda v: f"{v * 1000:.0f} ms")
    for n in result["prefill_tokens_per_s"]:
        table.add_row(f"prefill {n} tokens", f"{result['prefill_tokens_per_s'][n]:,.0f} tokens/s",
                      *([f"{peer['prefill_tokens_per_s'][n]:,.0f} tokens/s", f"{result['ratios'][f'prefill_{n}']:.2f}×"]
                        if peer else []))
    row(f"decode ({result['decode_tokens']} tokens)", "decode_tokens_per_s", lambda v: f"{v:,.1f} tokens/s",
        result["ratios"]["decode"] if peer else None)
    table.add_row("decode limit (bandwidth)",
                  f"{result['decode_tokens_per_s_limit']:,.1f} tokens/s "
                  f"({result['decode_bandwidth_fraction']:.0%} reached)")
    table.add_row("bytes read per token", f"{result['decode_bytes_per_token'] / 2**20:,.1f} MiB")
    if "ppl" in result:
        table.add_row("perplexity", f"{result['ppl']:.4f} over {result['ppl_tokens']:,} tokens")
        table.add_row("bits per byte", f"{result['bits_per_byte']:.4f}")
    if "delegated_nodes" in result:
        table.add_row("nodes on the delegate", f"{result['delegated_nodes']} of {result['nodes']}")
    row("peak memory", "peak_rss_bytes", lambda v: f"{v / 2**30:.2f} GiB")
    return table
