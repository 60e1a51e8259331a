"""`nano report`: tables and charts that put several runs, quantized models or benchmarks side by side."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import CONTEXT, Group
from nano.errors import NanoError

out_option = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                          help="Directory the report is written to.")


@click.group("report", cls=Group, context_settings=CONTEXT)
def report_group():
    """Compare finished work: distillation runs, quantized models, benchmark results."""


@report_group.command("distill")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option
def distill_report(run_dirs: tuple[Path, ...], out_dir: Path) -> None:
    """Plot each RUN_DIR's loss curve and compare the runs (named by directory) in OUT: comparison.md, .json,
    .png (held-out perplexity against tokens seen; KD vs the CE run at equal tokens)."""
    from distill.report import compare_runs, plot_run

    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise NanoError(f"run directories must have distinct names, got {', '.join(names)}")
    for run_dir in run_dirs:
        click.echo(f"wrote {plot_run(run_dir)}")
    compare_runs(dict(zip(names, run_dirs)), out_dir)
    click.echo((out_dir / "comparison.md").read_text(), nl=False)


@report_group.command("quantize")
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option
def quantize_report(directories: tuple[Path, ...], out_dir: Path) -> None:
    """Compare quantized model DIRECTORIES (their quant.json reports) in OUT: comparison.md, .json, .png."""
    from quantize.report import compare_directories

    compare_directories(list(directories), out_dir)
    click.echo((out_dir / "comparison.md").read_text(), nl=False)


@report_group.command("bench")
@click.argument("results", nargs=-1, required=True)
@out_option
def bench_report(results: tuple[str, ...], out_dir: Path) -> None:
    """Report NAME=FILE results (each `nano bench --json` output) together in OUT: bench.md, .json, .png."""
    from bench.report import read_bench, write_report

    loaded = {}
    for name, file in _named(results, "NAME=FILE with an existing `nano bench --json` file",
                             valid=lambda file: Path(file).is_file()).items():
        by_artifact = read_bench(file)  # one result, or several benched together (named NAME/ARTIFACT)
        loaded.update({name: next(iter(by_artifact.values()))} if len(by_artifact) == 1 else
                      {f"{name}/{artifact}": r for artifact, r in by_artifact.items()})
    for path in write_report(loaded, out_dir):
        click.echo(path)


@report_group.command("students")
@click.argument("models", nargs=-1, required=True)
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A text to measure bits per byte on (repeatable): held-out text, and text outside the corpus.")
@click.option("--bench", "bench_file", type=click.Path(dir_okay=False),
              help="`nano bench --json` results of the models' artifacts, each named NAME.litertlm.")
@out_option
def students_report(models: tuple[str, ...], texts: tuple[str, ...], bench_file: str | None, out_dir: Path) -> None:
    """Students beside their teacher in OUT (students.md, .json, .png): each NAME=MODEL, the first the reference
    (the teacher). Parameters, bits per byte of each float model on each --text, and from --bench the artifacts'
    size, prefill and decode speed.

    \b
    nano report students teacher=gemma3-270m kd=runs/kd/final --text heldout.txt --bench bench.json --out OUT
    """
    from bench.report import read_bench
    from bench.students import compare_students

    compare_students(_named(models, "NAME=MODEL", valid=bool), texts=list(texts), out_dir=out_dir,
                     bench=read_bench(bench_file) if bench_file else None)
    click.echo((out_dir / "students.md").read_text(), nl=False)


def _named(items: tuple[str, ...], form: str, *, valid) -> dict[str, str]:
    """NAME=VALUE arguments as {name: value}; one clear error for an item not of that form or whose value is not
    `valid`."""
    named = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not valid(value):
            raise NanoError(f"expected {form}, got {item!r}")
        named[name] = value
    return named
