"""Terminal output: progress and status go to stderr, so stdout stays clean for results and --json."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str):
    with console.status(message):
        yield
    console.print(f"[green]✓[/] {message}")


def progress_bar(*, speed: bool = False) -> Progress:
    """With `speed`, tasks carry a `speed` field (e.g. "1,234 tok/s · MFU 41%") shown after the count."""
    extra = [TextColumn("{task.fields[speed]}")] if speed else []
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
