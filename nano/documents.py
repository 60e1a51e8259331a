"""Documents from the sources every command that reads text takes (`nano distill --data`, `nano prune
--calibration`): text files, directories, JSONL, parquet, or the default corpus.

What counts as a document (a PATH is a file, a directory, or the word "stdlib"):
  - `.txt`, `.md`, `.py`: the whole file is one document.
  - `.jsonl`: one document per non-blank line, from its `text` string field.
  - `.parquet`: one document per non-null value of its `text` column (string or binary).
  - a directory: every file with one of those suffixes below it, recursively and in sorted order; files and
    folders whose names start with "." are skipped.
  - "stdlib": the default corpus of `nano.corpus`, whose own train / held-out split by file is kept.
Bytes that are not UTF-8 are skipped (not replaced) and counted; empty documents are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from nano import corpus
from nano.errors import NanoError

STDLIB = "stdlib"
SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
HELDOUT_FRACTION = 0.02  # of the documents, by a stable hash of each one's key, where the source fixes no split
NON_TEXT_LIMIT = 0.05  # a larger fraction of undecodable bytes and control characters is not text
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # C0 controls and DEL, whitespace excepted


@dataclasses.dataclass(frozen=True)
class Document:
    """One document's text. `key` (path relative to what the user named, plus an index) decides the held-out
    split, so moving the corpus does not change it; `split` is set where the source fixes it ("stdlib")."""

    key: str
    text: str
    source: Path
    split: str | None = None


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, number of bytes skipped because they are not valid UTF-8)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="ignore")
        return text, len(raw) - len(text.encode("utf-8"))  # valid sequences re-encode to the same bytes


def _jsonl_documents(path: Path, key: str) -> tuple[list[Document], int]:
    docs, skipped = [], 0
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        line, bad = decode_utf8(raw)
        skipped += bad
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise NanoError(f"{path}:{number}: no 'text' string field")
        docs.append(Document(f"{key}:{number}", record["text"], path))
    return docs, skipped


def _parquet_documents(path: Path, key: str) -> tuple[list[Document], int]:
    import pyarrow.parquet as pq  # only parquet corpora need pyarrow

    try:
        if "text" not in pq.read_schema(path).names:
            raise NanoError(f"{path}: no 'text' column")
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise NanoError(f"{path}: not a readable parquet file ({e})") from None
    docs, skipped = [], 0
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            value, bad = decode_utf8(value)
            skipped += bad
        if value is not None:
            docs.append(Document(f"{key}:{i}", str(value), path))
    return docs, skipped


def _file_documents(path: Path, key: str) -> tuple[list[Document], int]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, key)
    if suffix == ".parquet":
        return _parquet_documents(path, key)
    if suffix not in SUFFIXES:
        raise NanoError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use {', '.join(SUFFIXES)}")
    text, skipped = decode_utf8(path.read_bytes())
    return [Document(key, text, path)], skipped


def _stdlib_documents() -> tuple[list[Document], int]:
    docs, skipped, root = [], 0, corpus.stdlib_dir()
    for split in corpus.SPLITS:
        for path in corpus.corpus_files(split):
            text, bad = decode_utf8(path.read_bytes())
            docs.append(Document(f"stdlib/{path.relative_to(root).as_posix()}", text, path, split))
            skipped += bad
    return docs, skipped


def read_documents(paths: Sequence[str | Path]) -> tuple[list[Document], int]:
    """Every non-empty document under `paths` (see the module docstring), and the count of skipped bytes."""
    docs, skipped = [], 0
    for name in paths:
        if str(name) == STDLIB:
            found, bad = _stdlib_documents()
            docs, skipped = docs + found, skipped + bad
            continue
        path = Path(name)
        if not path.exists():
            raise NanoError(f"no such file or directory: {name}")
        if path.is_dir():
            files = [(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in sorted(path.rglob("*"))
                     if p.is_file() and p.suffix.lower() in SUFFIXES
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        else:
            files = [(path, path.name)]
        for file, key in files:
            found, bad = _file_documents(file, key)
            docs.extend(found)
            skipped += bad
    return [d for d in docs if d.text], skipped


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, heldout): by the document's own split where it has one, else by a stable hash of its key."""
    def heldout(doc: Document) -> bool:
        if doc.split is not None:
            return doc.split == "heldout"
        bucket = int.from_bytes(hashlib.sha256(doc.key.encode()).digest()[:8], "big") / 2**64
        return bucket < heldout_fraction

    flags = [heldout(d) for d in docs]
    return [d for d, h in zip(docs, flags) if not h], [d for d, h in zip(docs, flags) if h]


def training_texts(paths: Sequence[str | Path], *, what: str) -> list[str]:
    """The texts of the documents under `paths` that a training run would train on (their held-out split left
    out, as `nano distill` splits it), refused in one line when there are none or when they are not text: more
    than NON_TEXT_LIMIT of their bytes undecodable or control characters (a binary file, random bytes)."""
    docs, skipped = read_documents(paths)
    train, _ = split_documents(docs, HELDOUT_FRACTION)
    where = ", ".join(map(str, paths))
    if not train:
        raise NanoError(f"{what} {where} holds no text to read (empty, or every document held out)")
    texts = [d.text for d in train]
    refuse_non_text(texts, skipped, what=f"{what} {where}")
    return texts


def refuse_non_text(texts: Sequence[str], skipped: int, *, what: str) -> None:
    """The one rule for text that is not text: NanoError when more than NON_TEXT_LIMIT of the bytes read (the
    UTF-8 of `texts` plus the `skipped` undecodable bytes) were undecodable or control characters."""
    size = sum(len(t.encode("utf-8")) for t in texts) + skipped
    control = sum(len(_CONTROL.findall(t)) for t in texts)
    if size and (skipped + control) / size > NON_TEXT_LIMIT:
        raise NanoError(f"{what} is not text: {(skipped + control) / size:.0%} of its bytes are not UTF-8 text "
                        "(a binary file?)")
