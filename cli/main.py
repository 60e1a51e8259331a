"""`nano`: the command group, and where each stage's commands are registered."""

from __future__ import annotations

import click

from cli import app, bench, distill, export, model, prune, quantize, report, verify
from cli.common import CONTEXT, Group


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="nano-distill")
def cli():
    """nano: distil a teacher LLM into small on-device students, quantize to 4 bits, export to LiteRT.

    MODEL arguments take a model directory or `gemma3-270m` (the embedded default teacher, imported from its PyPI
    package on first use and cached under $NANO_CACHE, default ~/.cache/nano).
    """


for command in (*model.COMMANDS, prune.prune_cmd, *distill.COMMANDS, quantize.quantize_cmd, export.export_cmd, bench.bench_cmd,
                report.report_group, *app.COMMANDS, verify.verify_cmd):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="nano")


if __name__ == "__main__":
    main()
