"""The one error type a user sees: the command line prints its message as a single line and exits non-zero."""

from __future__ import annotations

import logging
import sys
import warnings


class NanoError(Exception):
    """Bad input or a failed stage, with a message that says what and why."""


def drop_closed_loop_reports() -> None:
    """Keep the checkpoint library's teardown from printing after the one error line.

    Orbax reads a checkpoint through tensorstore on an asyncio loop. When one read fails (a truncated parameter
    file), the loop is closed while other reads are still in flight; each of those, completing later on a
    tensorstore thread, reports `RuntimeError: Event loop is closed` through sys.unraisablehook: dozens of
    tracebacks around the one line that said what was wrong, some after it, until the process exits. They say
    nothing that line does not, so exactly those reports are dropped, for the rest of the process (stragglers
    arrive until exit); any other unraisable error still reaches the previous hook. Likewise a write that fails
    (a full disk) leaves Orbax's pending writes as coroutines that are never awaited, each a RuntimeWarning when
    it is collected, and as asyncio tasks whose same failure nobody retrieved, each an ERROR record of the asyncio
    logger, at any time up to exit; a truncated file's failed reads leave such tasks too. Idempotent."""
    warnings.filterwarnings("ignore", r"coroutine '.*(write_fragment|_serialize|_write).*' was never awaited",
                            RuntimeWarning)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReported) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReported())
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


class _UnretrievedReported(logging.Filter):
    """Drops asyncio's "Task (Future, _GatheringFuture) exception was never retrieved" for a write that found the
    disk full, or for a read past the end of a truncated parameter file (each reported once, in the error line);
    every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from nano.files import is_disk_full  # nano.files imports this module

        error = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")
        damaged = error is not None and (is_disk_full(error) or "OUT_OF_RANGE" in str(error))
        return not (unretrieved and damaged)
