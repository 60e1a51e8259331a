"""`nano quantize`: the command-line face of quantize.run."""

from __future__ import annotations

import json

import click

from cli.common import CONTEXT
from nano.quant_scheme import EMBEDDINGS
from quantize.settings import METHODS, PROJECTIONS, QuantizeSettings, parse_block_size, parse_projections

DEFAULTS = QuantizeSettings()


@click.command("quantize", context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Quantized model directory to write.")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULTS.method, show_default=True,
              help="Round to nearest, GPTQ (Hessian error feedback) or AWQ (activation-aware scales + clipping).")
@click.option("--block-size", default=str(DEFAULTS.block_size), show_default=True,
              help="Weights per int4 scale along the input dimension (32, 64, 128, ...) or 'channel'.")
@click.option("--embeddings", type=click.Choice(EMBEDDINGS), default=DEFAULTS.embeddings, show_default=True,
              help="The tied embedding / output head: int8 per row, int4 in blocks (with --method gptq calibrated "
                   "as the head: half the bytes each decoded token reads, at some cost in quality), or kept float.")
@click.option("--int8", "int8", default="", metavar="NAMES",
              help="Projections kept at int8 per channel in every block, comma-separated "
                   f"({', '.join(PROJECTIONS)}), as llama.cpp's Q4_K_M keeps attn_v and ffn_down at 6 bits: "
                   "attn.v_proj,mlp.down took the make-distill student from +5.8% to +3.3% bits per byte over "
                   "float for 15% more bytes.")
@click.option("--rotate", default=DEFAULTS.rotate, show_default=True, metavar="BLOCK",
              help="Multiply each projection's input (the normed block inputs into q/k/v and gate/up, the MLP's "
                   "product into down) and kernel by a block-diagonal Hadamard matrix of this block (a power of "
                   "two; 0: none): the same function with its outlier channels spread, so int4 and the device's "
                   "int8 inputs round it with less loss (make-distill student, GPTQ: +5.8% → +3.1% bits per byte "
                   "over float); the artifact computes it as three small float matmuls per layer.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration text for GPTQ/AWQ (default: the stdlib corpus's train split).")
@click.option("--samples", default=DEFAULTS.samples, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=DEFAULTS.seq_len, show_default=True, help="Tokens per calibration sequence.")
@click.option("--act-order/--no-act-order", default=DEFAULTS.act_order, show_default=True,
              help="GPTQ: quantize the most active inputs first.")
@click.option("--damp", default=DEFAULTS.damp, show_default=True, help="GPTQ: Hessian damping (fraction of its mean diagonal).")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="Text for the perplexity / KL / top-1 report (default: 40k characters of the held-out split).")
@click.option("--no-eval", is_flag=True, help="Skip the comparison with the float model.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quantize_cmd(model, out, method, block_size, embeddings, int8, rotate, calibration, samples, seq_len, act_order,
                 damp, eval_text, no_eval, force, as_json):
    """Quantize MODEL's weights to 4 bits (symmetric int4 in blocks along the input dimension, LiteRT's scheme).

    \b
    nano quantize gemma3-270m --out runs/q/rtn
    nano quantize gemma3-270m --method gptq --out runs/q/gptq
    nano quantize runs/kd/final --method awq --block-size 128 --out runs/q/kd-awq

    The result is a model directory (quant.json describes the codes and scales) that every command takes.
    """
    from quantize.run import quantize

    settings = QuantizeSettings(method=method, block_size=parse_block_size(block_size), embeddings=embeddings,
                                calibration=calibration, samples=samples, seq_len=seq_len, act_order=act_order,
                                damp=damp, int8=parse_projections(int8), rotate=rotate)
    result = quantize(model, out, settings, eval_path=eval_text, evaluate=not no_eval, force=force)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['source']['model']} → {result['out']} ({result['method']} {result['scheme']})",
                  show_header=False)
    table.add_row("bits per weight (all / projections)",
                  f"{result['bits_per_weight']:.3f} / {result['bits_per_linear_weight']:.3f}")
    table.add_row("size on disk", f"{result['bytes_on_disk'] / 2**20:,.1f} MiB "
                                  f"(float: {result['source_bytes_on_disk'] / 2**20:,.1f} MiB)")
    report = result.get("report")
    if report:
        table.add_row("perplexity float → quantized",
                      f"{report['float_ppl']:.4f} → {report['quant_ppl']:.4f} ({report['ppl_increase_pct']:+.2f}%)")
        table.add_row("KL(float ‖ quantized) per token", f"{report['kl']:.5f}")
        table.add_row("top-1 agreement", f"{report['top1_agreement']:.4f}")
        table.add_row("evaluated on", f"{report['tokens']:,} tokens of {report['text']}")
    table.add_row("time", f"{result['seconds']:.1f} s")
    Console().print(table)
