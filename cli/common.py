"""What every command shares: one-line errors, the dtype option, JSON output."""

from __future__ import annotations

import json

import click

from nano.errors import NanoError, drop_closed_loop_reports
from nano.files import disk_full_as_error

DTYPES = ("float32", "bfloat16")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class OneLineErrors:
    """Mixed into a click command or group: a NanoError anywhere below becomes one `Error: ...` line and exit
    status 1 (the `nano` group, and `nano-export` run on its own), and so does a write that found the disk full
    (every stage writes under temporary names, so nothing is left under a final one)."""

    def invoke(self, ctx):
        drop_closed_loop_reports()  # every command that reads a checkpoint (a run's resume too) ends in one line
        try:
            with disk_full_as_error():
                return super().invoke(ctx)
        except NanoError as e:
            raise click.ClickException(str(e)) from None


class Group(OneLineErrors, click.Group):
    """A command group whose commands fail in one line."""


class Command(OneLineErrors, click.Command):
    """A command that fails in one line when run on its own (under a Group it would anyway)."""


def jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None if isinstance(obj, list) else 2))


dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                            help="Compute dtype; parameters keep their stored precision.")
