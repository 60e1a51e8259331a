"""`nano prune`: the command-line face of prune.run."""

from __future__ import annotations

import json

import click

from cli.common import CONTEXT
from prune.settings import PruneSettings, parse_layers

DEFAULTS = PruneSettings()


@click.command("prune", context_settings=CONTEXT)
@click.argument("teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--calibration", multiple=True, default=DEFAULTS.calibration, show_default=True,
              help="Calibration text, as `nano distill --data` takes it: files, directories, .jsonl, .parquet or "
                   "'stdlib'; repeatable. Its held-out split is never read.")
@click.option("--vocab-size", type=int, help="Keep this many vocabulary pieces: the calibration text's most used, "
                                             "their merge paths, and every control, byte and user-defined piece.")
@click.option("--layers", type=int, help="Keep this many layers: those whose removal costs the most loss.")
@click.option("--keep-layers", help="Or keep exactly these teacher layers, e.g. 0-5,8,11-17.")
@click.option("--ffn-dim", type=int, help="Keep this many FFN neurons per layer (activation importance).")
@click.option("--num-heads", type=int, help="Keep this many query heads per layer, evenly from each KV group.")
@click.option("--d-model", type=int, help="Keep this many embedding channels (norm-output importance).")
@click.option("--samples", default=DEFAULTS.samples, show_default=True,
              help="Calibration windows the importance scores are measured on.")
@click.option("--seq-len", default=DEFAULTS.seq_len, show_default=True, help="Tokens per calibration window.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print prune.json's summary as JSON.")
def prune_cmd(teacher, out, calibration, vocab_size, layers, keep_layers, ffn_dim, num_heads, d_model, samples,
              seq_len, force, as_json):
    """Cut a student from TEACHER by measured importance (Minitron): depth, width and vocabulary.

    \b
    nano prune gemma3-270m --out runs/p/vocab --vocab-size 32768
    nano prune gemma3-270m --out runs/p/v-l16 --vocab-size 32768 --layers 16 --calibration stdlib
    nano prune gemma3-270m --out runs/p/v-ffn --vocab-size 32768 --ffn-dim 1536

    Each axis is optional; with none the student is the teacher. The student is a float model directory (heal it
    with `nano distill --student DIR`), with prune.json (what was kept, every importance score, parameter counts)
    and prune.png (the scores and the cut).
    """
    from prune.run import prune

    settings = PruneSettings(calibration=tuple(calibration), vocab_size=vocab_size, layers=layers,
                             keep_layers=parse_layers(keep_layers) if keep_layers else None, ffn_dim=ffn_dim,
                             num_heads=num_heads, d_model=d_model, samples=samples, seq_len=seq_len)
    record = prune(teacher, out, settings, force=force)
    summary = {"out": str(out), "teacher_params": record["teacher"]["params"],
               "student_params": record["student"]["params"],
               "fraction_of_teacher": record["student"]["fraction_of_teacher"],
               "kept_layers": record["kept"].get("layers"), "vocab_size": len(record["kept"].get("vocab", [])) or None,
               "coverage": record["calibration"].get("coverage"),
               "depth_rank_correlation": record.get("depth_rank_correlation"), "seconds": record["seconds"],
               "peak_rss_bytes": record["peak_rss_bytes"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{out}: {summary['student_params']:,} parameters ({summary['fraction_of_teacher']:.1%} of the "
               f"teacher's {summary['teacher_params']:,}) in {summary['seconds']:.0f} s, peak memory "
               f"{summary['peak_rss_bytes'] / 2**30:.1f} GiB"
               + (f"; layers kept {summary['kept_layers']}" if summary["kept_layers"] else "")
               + (f"; vocabulary {summary['vocab_size']:,} pieces covering {summary['coverage']:.2%} of the "
                  "calibration tokens" if summary["vocab_size"] else ""))
