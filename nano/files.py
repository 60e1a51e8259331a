"""Files that appear whole or not at all, and what a process leaves on disk and in memory.

Every stage writes its results here: a reader (or a resumed run) never finds half a checkpoint, JSON, PNG or
artifact under its final name, because each is written under a temporary name in the same directory and renamed
into place when complete (a rename within one directory is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from nano.documents import decode_utf8, refuse_non_text
from nano.errors import NanoError


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Did this write fail for want of space? An OSError says so by its errno; the checkpoint library's storage
    layer (tensorstore) raises a ValueError whose message carries the system's words (not only RESOURCE_EXHAUSTED,
    which XLA also says when memory runs out)."""
    if isinstance(error, OSError):
        return error.errno in _NO_SPACE
    return any(os.strerror(code) in str(error) for code in _NO_SPACE)


def free_bytes(path: str | Path) -> int:
    """Bytes free to this process on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


class DiskFull(NanoError):
    """A write that ran out of space, in one line: what was not written, where, and what to do."""

    def __init__(self, path: str | Path, what: str, *, then: str = "run the command again"):
        self.path, self.what = Path(path), what
        super().__init__(f"no space left on the device holding {path} ({free_bytes(path) / 2**20:,.1f} MiB free): "
                         f"{what}; free some space and {then}")


@contextlib.contextmanager
def disk_full_as_error(*, where: str | Path | None = None, then: str | None = None) -> Iterator[None]:
    """A write below that finds the disk full becomes one DiskFull line: `where` names the place when the error
    does not (a write through a file object), `then` what to do once space is back. Every stage writes under
    temporary names, so nothing is left under a final name; an appended log may end in a line cut short, which a
    resumed run drops."""
    more = {"then": then} if then else {}
    try:
        yield
    except DiskFull as e:
        if then is None:
            raise
        raise DiskFull(e.path, e.what, then=then) from None
    except OSError as e:
        if not is_disk_full(e):
            raise
        path = e.filename or where or "."
        raise DiskFull(path, f"a write to {path} failed (nothing is left under a final name)", **more) from None


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """Run write(temporary path), then rename it onto `path`. `durable` also fsyncs the file and the rename, for
    what a killed process must find intact (the teacher cache's shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DiskFull(path, f"{path} was not written (nothing is left under its name)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`path` holds `text` (UTF-8), written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib Figure as a PNG, atomically. Figures are built with the object API (`Figure`, no pyplot), which
    renders with Agg and keeps no global state: safe headless and in threads."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch_directory(beside: str | Path) -> Iterator[Path]:
    """A private temporary directory next to `beside` (same filesystem, so its files rename into place), removed
    afterwards whatever happens."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory to fill; when the block succeeds it becomes `out` (replacing an old one only with
    `overwrite`), when it fails nothing is left. Refuses an existing `out` without `overwrite` before any work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise NanoError(f"{out} already exists (pass --force to replace it)")
    with scratch_directory(out) as tmp:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a model directory, a cache): what it takes on disk."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_text(path: str | Path) -> str:
    """A text file a command works on, as UTF-8, read as the data loader reads documents (nano.documents): bytes
    that are not UTF-8 are skipped, and a file with too many of them or of control characters is refused in one
    line (random bytes are not text to score); below that limit the skipped bytes are counted and reported on
    stderr. One clear error, too, when the file is missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise NanoError(f"{path} does not exist or is not a file")
    text, skipped = decode_utf8(p.read_bytes())
    refuse_non_text([text], skipped, what=str(path))
    if not text.strip():
        raise NanoError(f"{path} is empty: nothing to work on")
    if skipped:
        from nano.ui import console

        console.print(f"{path}: {skipped:,} undecodable bytes skipped", markup=False, highlight=False,
                      soft_wrap=True)  # one line, however narrow the terminal
    return text
