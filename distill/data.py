"""Distillation data: documents (`nano.documents`: files, directories, JSONL, parquet, `stdlib`), tokenized once
with the student's tokenizer, packed into fixed-length rows with document masking, and served as shuffled global batches by a Grain pipeline whose position is a small
JSON dict, so a resumed run sees exactly the batches the uninterrupted run would have.

    data = make_datasets(["corpus/"], tokenizer, seq_len=512, batch_size=64, seed=0)
    it = data.train_iterator(state=None)   # or the state saved at the last checkpoint
    batch = next(it)                        # dict of numpy arrays, each [batch_size, seq_len]
    state = it.get_state()                  # JSON-serialisable; data.train_iterator(state) continues from here

Packing. Each document becomes [BOS] + encode(text) + [EOS]; documents are concatenated into one stream, which is
cut into rows of seq_len + 1 tokens that overlap by one (row r holds stream[r*S : r*S + S + 1]): inputs =
row[:-1], targets = row[1:], so each token after the first is a target exactly once. Only the last row is
padded (pad_id, segment 0). Within a row, segments are numbered 1, 2, 3, ... in order and positions restart at 0
at each segment. A document longer than what is left of a row continues in the next row as a new segment whose
positions restart at 0 and whose first input is BOS in place of the stream's token (weight 0 there: that target
would be predicted from nothing of its document). Gemma reads text only after BOS: on the first held-out stdlib
rows the embedded teacher scores 3.23 nats per token without it and 2.21 with it, so rows opening mid-document
without BOS would teach the student the teacher's confusion, and CE would learn that regime instead of real text.
weights = 1 where the target is the next token of the same document, 0 at padding, where an EOS is followed by the
next document and at the first position of a continued document.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from nano.documents import HELDOUT_FRACTION, SUFFIXES, Document, read_documents, split_documents
from nano.errors import NanoError
from nano.tokenizer import Tokenizer



@dataclasses.dataclass(frozen=True)
class PackedRows:
    """The token stream of many documents, read as overlapping rows of seq_len + 1 tokens.

    `stream` is padded with pad_id to rows * seq_len + 1 tokens; `starts` marks each document's first token.
    """

    stream: np.ndarray  # [rows * seq_len + 1] int32
    starts: np.ndarray  # [rows * seq_len + 1] bool
    length: int  # real tokens in the stream
    seq_len: int
    pad_id: int
    bos_id: int

    @property
    def rows(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The training arrays of these rows, each [len(rows), seq_len]; a row index of -1 is an empty row."""
        rows = np.asarray(rows, np.int64)
        width = self.seq_len + 1
        col = np.arange(width)
        index = np.maximum(rows, 0)[:, None] * self.seq_len + col  # [b, S + 1]
        tokens, starts = self.stream[index], self.starts[index]
        lengths = np.where(rows < 0, 0, np.clip(self.length - rows * self.seq_len, 0, width))
        valid = col[None] < lengths[:, None]
        continued = valid[:, 0] & ~starts[:, 0]  # rows that open mid-document
        starts[:, 0] = True  # a row always opens a segment
        tokens = np.where(valid, tokens, self.pad_id).astype(np.int32)
        tokens[continued, 0] = self.bos_id
        segments = (np.cumsum(starts, axis=1) * valid).astype(np.int32)
        last_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
        positions = ((col - last_start) * valid).astype(np.int32)
        weights = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        weights[continued, 0] = False
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions[:, :-1],
                "segment_ids": segments[:, :-1], "weights": weights.astype(np.float32)}


def pack(token_lists: Sequence[Sequence[int]], *, seq_len: int, pad_id: int, bos_id: int) -> PackedRows:
    """Concatenate already delimited documents (BOS ... EOS) and lay them out as rows; see the module docstring."""
    lengths = np.array([len(t) for t in token_lists], np.int64)
    length = int(lengths.sum())
    rows = max(1, -(-(length - 1) // seq_len))
    stream = np.full(rows * seq_len + 1, pad_id, np.int32)
    starts = np.zeros(rows * seq_len + 1, bool)
    if length:
        stream[:length] = np.concatenate([np.asarray(t, np.int32) for t in token_lists])
        starts[np.cumsum(lengths) - lengths] = True
    return PackedRows(stream, starts, length, seq_len, pad_id, bos_id)


def tokenize(docs: Sequence[Document], tokenizer: Tokenizer) -> list[np.ndarray]:
    """[BOS] + encode(text) + [EOS] for each document, as int32 arrays."""
    bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
    return [np.array(bos + tokenizer.encode(d.text) + eos, np.int32) for d in docs]


# ---------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class DataStats:
    documents: int
    tokens: int
    rows: int
    heldout_documents: int
    heldout_tokens: int
    heldout_rows: int
    skipped_bytes: int

    def summary(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens, {self.rows} rows; held out "
                f"{self.heldout_documents} documents, {self.heldout_tokens} tokens; "
                f"{self.skipped_bytes} undecodable bytes skipped")


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What the distillation loop consumes: endless shuffled training batches and a fixed held-out set."""

    train: PackedRows
    heldout: PackedRows | None
    stats: DataStats
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return self.train.rows // self.batch_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the training batches: the token stream, seq_len, batch size and seed."""
        h = hashlib.sha256(self.train.stream)  # the contiguous array's buffer, not a copy
        h.update(np.packbits(self.train.starts).tobytes())
        # "bos-rows": continued documents open with BOS (a cache of batches laid out before that is not these)
        h.update(f"{self.train.length},{self.train.seq_len},{self.batch_size},{self.seed},bos-rows".encode())
        return h.hexdigest()[:16]

    def train_dataset(self) -> grain.MapDataset:
        """Infinite batches. Each epoch is a fresh permutation of the rows (Grain folds the epoch into the shuffle
        seed) cut into whole batches; the rows left over at an epoch's end wait for a later epoch's order."""
        shuffle_seed = int(np.random.SeedSequence(self.seed).generate_state(1)[0])  # unrelated orders per seed
        rows = grain.MapDataset.range(self.train.rows).shuffle(seed=shuffle_seed)
        return rows.batch(self.batch_size, drop_remainder=True).repeat().map(self.train.batch)

    def train_iterator(self, state: dict | None = None) -> "TrainIterator":
        return TrainIterator(self, state)

    def heldout_batches(self, *, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
        """The held-out rows in order, in batches of batch_size; the last one is filled with empty rows (weight 0)."""
        if self.heldout is None:
            return []
        count = -(-self.heldout.rows // self.batch_size)
        count = count if max_batches is None else min(count, max_batches)
        batches = []
        for b in range(count):
            rows = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
            batches.append(self.heldout.batch(np.where(rows < self.heldout.rows, rows, -1)))
        return batches


class TrainIterator(Iterator[dict]):
    """Training batches from a Grain iterator. `get_state()` is JSON:

        {"grain": <Grain's iterator state>, "batches": batches served, "epoch": epoch of the next batch,
         "fingerprint": Datasets.fingerprint}

    `set_state` refuses a state whose fingerprint belongs to other data (another corpus, tokenizer, seq_len,
    batch size or seed), since its batches would silently differ from the interrupted run's.
    """

    def __init__(self, data: Datasets, state: dict | None = None):
        self._fingerprint = data.fingerprint
        self._per_epoch = data.batches_per_epoch
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # rows are in memory already
        self._it = iter(data.train_dataset().to_iter_dataset(options))
        self._batches = 0
        if state is not None:
            self.set_state(state)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._batches += 1
        return batch

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "batches": self._batches,
                "epoch": self._batches // self._per_epoch, "fingerprint": self._fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise NanoError("the saved data position belongs to other data (corpus, tokenizer, seq_len, batch "
                            "size or seed changed); resume with the original data settings")
        self._it.set_state(state["grain"])
        self._batches = int(state["batches"])


def make_datasets(paths: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION,
                  eval_paths: Sequence[str | Path] | None = None) -> Datasets:
    """Read, split, tokenize and pack the corpus once; everything the loop needs is on the result.

    The held-out documents are `eval_paths` when given (the training data then keeps none back, and a file in
    both is refused), else a `heldout_fraction` of the documents by a stable hash of each one's path and index.
    Raises NanoError for a missing path, an unsupported file, an empty corpus, or fewer rows than one batch.
    """
    if not 0 <= heldout_fraction < 1:
        raise NanoError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    if seq_len < 1 or batch_size < 1:
        raise NanoError(f"seq_len and batch size must be positive, got {seq_len} and {batch_size}")
    docs, skipped = read_documents(paths)
    if eval_paths:
        eval_docs, eval_skipped = read_documents(eval_paths)
        train = [d for d in docs if d.split != "heldout"]
        heldout = [d for d in eval_docs if d.split != "train"]
        _refuse_overlap(train, heldout)
        skipped += eval_skipped
    else:
        train, heldout = split_documents(docs, heldout_fraction)
    if not train:
        where = ", ".join(map(str, paths))
        held = f" ({len(docs)} fell in the held-out split)" if docs else ""
        raise NanoError(f"no training documents in {where}{held}; a directory counts {', '.join(SUFFIXES)} files")
    layout = {"seq_len": seq_len, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id}
    packed = pack(tokenize(train, tokenizer), **layout)
    if packed.rows < batch_size:
        raise NanoError(f"corpus has {packed.rows} rows of {seq_len} tokens, fewer than one batch of {batch_size}")
    held = pack(tokenize(heldout, tokenizer), **layout) if heldout else None
    stats = DataStats(documents=len(train), tokens=packed.length, rows=packed.rows,
                      heldout_documents=len(heldout), heldout_tokens=held.length if held else 0,
                      heldout_rows=held.rows if held else 0, skipped_bytes=skipped)
    return Datasets(packed, held, stats, batch_size, seed)


def _refuse_overlap(train: list[Document], heldout: list[Document]) -> None:
    shared = {d.source.resolve() for d in train} & {d.source.resolve() for d in heldout}
    if shared:
        raise NanoError(f"{min(shared)} is in both the training and the eval data")
