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


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
