"""The one error type a user sees: the CLI prints its message as a single line and exits non-zero."""


class NanoError(Exception):
    """Bad input or a failed stage, with a message that says what and why."""


class OneLineErrors:
    """Mixed into a click command or group: a NanoError anywhere below becomes one `Error: ...` line and exit
    status 1 (the `nano` group, and `nano-export` run on its own)."""

    def invoke(self, ctx):
        import click

        try:
            return super().invoke(ctx)
        except NanoError as e:
            raise click.ClickException(str(e)) from None
