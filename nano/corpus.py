"""The default corpus: the running Python's standard-library sources, text every machine has and nobody here wrote.

Files are split into train and held-out by a stable hash of their relative path, so the split is the same on
every machine with the same Python, and no held-out file's text is ever trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from nano.errors import NanoError

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def corpus_files(split: str) -> list[Path]:
    if split not in SPLITS:
        raise NanoError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    root = stdlib_dir()
    files = [p for p in sorted(root.rglob("*.py"))
             if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return [p for p in files if split_of(p.relative_to(root).as_posix()) == split]


def corpus_text(split: str, *, max_chars: int | None = None) -> str:
    """The split's files in sorted order, joined by blank lines, cut to at most `max_chars` characters."""
    parts, size = [], 0
    for path in corpus_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text) + 2
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def text_or_split(path: str | None, split: str, *, max_chars: int) -> tuple[str, str]:
    """(text, where it came from): the file at `path`, or the default corpus's `split` cut to `max_chars`."""
    from nano.files import read_text

    if path is None:
        return corpus_text(split, max_chars=max_chars), f"stdlib {split} split ({max_chars:,} characters)"
    return read_text(path), str(path)
