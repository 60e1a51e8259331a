"""`nano verify`: is an artifact whole, and the file that was exported? (export.integrity)"""

from __future__ import annotations

import dataclasses

import click

from cli.common import print_json


@click.command("verify")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print what was checked as one JSON object.")
def verify_cmd(artifact, as_json):
    """Check ARTIFACT (.litertlm or .tflite) before any runtime maps it: the .litertlm container (header, section
    table, every section inside the file), each TFLite flatbuffer (every table and buffer inside it, every index
    pointing at something that exists), and the SHA-256 of every section against the digests the export recorded.
    One line: OK, or what is wrong (exit status 1)."""
    from export.integrity import check_artifact

    summary = check_artifact(artifact)
    if as_json:
        print_json(dataclasses.asdict(summary))
    else:
        click.echo(summary.line())
