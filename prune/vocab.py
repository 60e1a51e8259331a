"""Trim a SentencePiece BPE vocabulary to the pieces a student needs.

A student's embedding and output layer cost `vocab × width` parameters, so a small student wants far fewer than
the teacher's 262,144 pieces. Keeping the pieces a calibration corpus uses most is not enough for BPE: SentencePiece
reaches a piece only through the intermediate pieces its merges create on the way (it starts from characters and
repeatedly merges the adjacent pair whose concatenation is the highest-scored piece), so a kept piece whose
intermediates were dropped is never produced and text falls apart into smaller pieces. Each kept piece therefore
brings its merge path along, found by replaying SentencePiece's merge procedure (`bpe_model.cc`) on the piece's
own text with the teacher's full vocabulary.

The trimmed model keeps the teacher's pieces in teacher id order with their scores and types, so the kept ids
array is the student → teacher id map (`keep_ids[student_id]`), and the specials (pad 0, eos 1, bos 2, unk 3 in
Gemma) keep their ids. Characters that are no longer pieces are encoded as `<0xNN>` bytes (byte fallback), which
is why every byte piece is always kept; so is the space piece '▁', since bytes are not denormalised and a space
sent through them would decode as a literal '▁'.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from nano.errors import NanoError
from nano.tokenizer import Tokenizer

_Type = sp_pb2.ModelProto.SentencePiece
# SentencePiece merges into these (model_interface.cc); CONTROL, UNKNOWN and BYTE pieces are never matched in text.
_MERGEABLE = (_Type.NORMAL, _Type.USER_DEFINED, _Type.UNUSED)
_PLACEHOLDER = re.compile(r"<unused\d+>")  # Gemma's reserved, never-trained control pieces
_SPECIALS = ("unk", "bos", "eos", "pad")
_SPACE = "\u2581"  # '▁', SentencePiece's escaped space
_BATCH = 512  # texts per SentencePiece batch encode


@dataclass(frozen=True)
class TrimStats:
    """How a trimmed vocabulary was filled (the four sizes add up to it): `required` specials, bytes and
    user-defined pieces; `counted` pieces seen in calibration; `merge_path` unseen pieces kept only because a kept
    piece's merges pass through them; `filled` unseen pieces added by score to make the size exact. `coverage` is
    the fraction of calibration tokens whose piece was kept (1.0 when nothing was counted)."""

    required: int
    counted: int
    merge_path: int
    filled: int
    coverage: float


class _Vocab:
    """One parse of a model's pieces, the lookups BPE encoding needs, and a cache of merge paths per piece."""

    def __init__(self, proto: bytes):
        self.model = sp_pb2.ModelProto.FromString(proto)
        records = [(p.piece, p.score, p.type) for p in self.model.pieces]
        self.pieces = [r[0] for r in records]
        self.scores = np.array([r[1] for r in records], np.float32)
        self.types = np.array([r[2] for r in records], np.int8)
        self.mergeable = {piece: (i, score) for i, (piece, score, kind) in enumerate(records) if kind in _MERGEABLE}
        # User-defined pieces are matched whole (longest first) before any merge and are never merged further.
        self.user_defined = {piece for piece, _, kind in records if kind == _Type.USER_DEFINED}
        self.ud_lengths = sorted({len(p) for p in self.user_defined}, reverse=True)
        self.ud_first = {p[0] for p in self.user_defined}
        # Spaces are encoded as '▁'; without that piece they would go through byte fallback, and bytes are not
        # denormalised, so a space would decode as a literal '▁'.
        escapes = self.model.normalizer_spec.escape_whitespaces
        self.space = self.mergeable.get(_SPACE, (None,))[0] if escapes else None
        self.paths: dict[int, tuple[int, ...] | None] = {}

    def required_ids(self) -> np.ndarray:
        """Pieces every trimmed model keeps: specials (less the `<unused…>` placeholders), the unknown piece,
        user-defined pieces (they are matched before BPE runs), the 256 bytes (byte fallback needs them all) and
        the space piece '▁'."""
        t = self.types
        required = (t == _Type.CONTROL) & ~np.array([bool(_PLACEHOLDER.fullmatch(p)) for p in self.pieces])
        required |= (t == _Type.UNKNOWN) | (t == _Type.USER_DEFINED) | (t == _Type.BYTE)
        if self.space is not None:
            required[self.space] = True
        return np.flatnonzero(required)

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        """SentencePiece's initial split: the longest user-defined piece at each position (frozen), else one
        character."""
        symbols, frozen, pos = [], [], 0
        while pos < len(text):
            size = 1
            if text[pos] in self.ud_first:
                size = next((n for n in self.ud_lengths if text[pos:pos + n] in self.user_defined), 1)
            symbols.append(text[pos:pos + size])
            frozen.append(size > 1 or text[pos] in self.user_defined)
            pos += size
        return symbols, frozen

    def merge_path(self, i: int) -> tuple[int, ...] | None:
        """Ids of the pieces created while BPE-encoding piece `i`'s own text with the full vocabulary, ending with
        `i` itself; None when that encoding does not end in `i` (such a piece is never produced, so never worth
        keeping). Replays bpe_model.cc: merge the adjacent non-frozen pair whose concatenation is the highest-scored
        piece, ties leftmost; characters need not be pieces themselves (byte fallback covers them)."""
        if i in self.paths:
            return self.paths[i]
        symbols, frozen = self._symbols(self.pieces[i])

        def pair(k):  # (score, id) of the piece symbols k and k+1 would merge into, or None
            if frozen[k] or frozen[k + 1]:
                return None
            hit = self.mergeable.get(symbols[k] + symbols[k + 1])
            return None if hit is None else (hit[1], hit[0])

        pairs = [pair(k) for k in range(len(symbols) - 1)]
        created = []
        while True:
            best = -1
            for k, p in enumerate(pairs):
                if p is not None and (best < 0 or p[0] > pairs[best][0]):
                    best = k
            if best < 0:
                break
            created.append(pairs[best][1])
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
            del frozen[best + 1], pairs[best]
            if best > 0:
                pairs[best - 1] = pair(best - 1)
            if best < len(pairs):
                pairs[best] = pair(best)
        path = tuple(dict.fromkeys(created + [i])) if len(symbols) == 1 else None  # one symbol: the piece
        self.paths[i] = path
        return path


@lru_cache(maxsize=4)
def _vocab(proto: bytes) -> _Vocab:
    return _Vocab(proto)


def piece_counts(tokenizer: Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """int64 count per teacher id of the teacher's tokenization of `texts` (no BOS), encoded in batches."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    texts = iter(texts)
    while batch := list(itertools.islice(texts, _BATCH)):
        ids = np.fromiter(itertools.chain.from_iterable(tokenizer.sp.encode(batch)), np.int64)
        counts += np.bincount(ids, minlength=len(counts))
    return counts


def _take(vocab: _Vocab, order, kept: set[int], limit: int, counts: np.ndarray, tally: dict) -> list[int]:
    """Add each piece of `order` with the not-yet-kept pieces of its merge path while the total stays within
    `limit`; returns the reachable pieces skipped for lack of room (a later pass may fit them). `tally` counts the
    added pieces as counted (seen in calibration), merge_path (unseen, kept for another's path) or filled."""
    skipped = []
    for i in order:
        if len(kept) == limit:
            break
        if i in kept:
            continue
        path = vocab.merge_path(i)
        if path is None:
            continue
        new = [j for j in path if j not in kept]
        if len(kept) + len(new) > limit:
            skipped.append(i)
            continue
        kept.update(new)
        for j in new:
            tally["counted" if counts[j] > 0 else "filled" if j == i else "merge_path"] += 1
    return skipped


def _select(tokenizer: Tokenizer, counts, vocab_size: int) -> tuple[np.ndarray, TrimStats]:
    vocab = _vocab(tokenizer.proto)
    counts = np.asarray(counts)
    n = len(vocab.pieces)
    if counts.shape != (n,):
        raise NanoError(f"counts has shape {counts.shape}; the tokenizer has {n} pieces, so one count per piece")
    required = vocab.required_ids()
    normal = np.flatnonzero(vocab.types == _Type.NORMAL)
    most = len(np.union1d(required, normal))
    if vocab_size < len(required):
        raise NanoError(f"vocab_size {vocab_size} is smaller than the {len(required)} required pieces (the control, "
                        f"unknown, user-defined, byte and space pieces every trimmed tokenizer keeps)")
    if vocab_size > most:
        raise NanoError(f"vocab_size {vocab_size} is larger than the {most} pieces a trimmed tokenizer can keep "
                        f"(the tokenizer's {n} less its unused placeholders)")
    kept = set(required.tolist())
    tally = {"counted": 0, "filled": 0, "merge_path": 0}
    counted = normal[counts[normal] > 0]
    uncounted = normal[counts[normal] <= 0]
    by_count = counted[np.lexsort((counted, -counts[counted]))].tolist()
    by_score = uncounted[np.lexsort((uncounted, -vocab.scores[uncounted]))].tolist()
    pending = _take(vocab, by_count, kept, vocab_size, counts, tally)
    pending += _take(vocab, by_score, kept, vocab_size, counts, tally)
    # A skipped piece fits once enough of its path is kept; some unkept piece always needs one slot, so this ends.
    while pending and len(kept) < vocab_size:
        before = len(kept)
        pending = _take(vocab, pending, kept, vocab_size, counts, tally)
        if len(kept) == before:
            break
    # Only unreachable pieces are left: harmless, and they make the size exact.
    rest = [i for i in by_count + by_score if i not in kept][:vocab_size - len(kept)]
    kept.update(rest)
    tally["counted"] += int(np.sum(counts[rest] > 0))
    tally["filled"] += int(np.sum(counts[rest] <= 0))
    keep_ids = np.array(sorted(kept), np.int64)
    total = counts.sum()
    coverage = float(counts[keep_ids].sum() / total) if total > 0 else 1.0
    return keep_ids, TrimStats(required=len(required), coverage=coverage, **tally)


def select_pieces(tokenizer: Tokenizer, counts, vocab_size: int) -> np.ndarray:
    """Sorted teacher ids to keep, exactly `vocab_size` of them: the required pieces, then NORMAL pieces by
    decreasing count (ties lower id) each with its merge path when the whole fits, then uncounted pieces by score
    with their merge paths until the size is exact."""
    return _select(tokenizer, counts, vocab_size)[0]


def teacher_to_student(keep_ids, teacher_vocab: int) -> np.ndarray:
    """The inverse map: student id per teacher id, −1 where the piece was dropped."""
    out = np.full(teacher_vocab, -1, np.int64)
    out[np.asarray(keep_ids)] = np.arange(len(keep_ids))
    return out


def _check_keep(vocab: _Vocab, ids: np.ndarray) -> None:
    """Refuse kept ids that would not make a loadable model, with a message saying why."""
    n = len(vocab.pieces)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise NanoError(f"keep_ids must be a non-empty 1-D array of integer ids, got shape {ids.shape} {ids.dtype}")
    if ids[0] < 0 or ids[-1] >= n or np.any(np.diff(ids) <= 0):
        raise NanoError(f"keep_ids must be strictly increasing teacher ids in [0, {n})")
    spec = vocab.model.trainer_spec
    kept = set(ids.tolist())
    for name in _SPECIALS:
        old = getattr(spec, f"{name}_id")
        if old >= 0 and old not in kept:
            raise NanoError(f"keep_ids drops the {name} piece {vocab.pieces[old]!r} (id {old}); a tokenizer needs it")
    if spec.byte_fallback:
        missing = int(np.sum(vocab.types == _Type.BYTE)) - int(np.sum(vocab.types[ids] == _Type.BYTE))
        if missing:
            raise NanoError(f"keep_ids drops {missing} byte pieces; byte fallback needs all 256")
    if vocab.space is not None and vocab.space not in kept:
        raise NanoError(f"keep_ids drops the space piece {_SPACE!r} (id {vocab.space}); without it spaces would "
                        f"decode as {_SPACE!r}")


def trim_tokenizer(tokenizer: Tokenizer, keep_ids) -> Tokenizer:
    """A SentencePiece model holding only the `keep_ids` pieces, in teacher id order (renumbered 0..V-1), with
    their scores and types, the vocab size and special ids updated. SentencePiece merges by score and does not
    need any piece order (a shuffled model encodes to the same pieces); teacher order keeps the specials at their
    ids and makes `keep_ids` the id map. Self-test samples are not copied: they were written for the full
    vocabulary, and SentencePiece refuses to load a model that fails them."""
    vocab = _vocab(tokenizer.proto)
    ids = np.asarray(keep_ids)
    _check_keep(vocab, ids)
    new_id = teacher_to_student(ids, len(vocab.pieces))
    model = sp_pb2.ModelProto()
    model.trainer_spec.CopyFrom(vocab.model.trainer_spec)
    model.normalizer_spec.CopyFrom(vocab.model.normalizer_spec)
    if vocab.model.HasField("denormalizer_spec"):
        model.denormalizer_spec.CopyFrom(vocab.model.denormalizer_spec)
    model.pieces.extend(vocab.model.pieces[i] for i in ids.tolist())
    model.trainer_spec.vocab_size = len(ids)
    for name in _SPECIALS:
        old = getattr(model.trainer_spec, f"{name}_id")
        if old >= 0:
            setattr(model.trainer_spec, f"{name}_id", int(new_id[old]))
    try:
        return Tokenizer(model.SerializeToString())
    except RuntimeError as e:
        raise NanoError(f"the trimmed vocabulary is not a valid SentencePiece model ({' '.join(str(e).split())})")


def trim_vocabulary(tokenizer: Tokenizer, texts: Iterable[str], vocab_size: int,
                    ) -> tuple[Tokenizer, np.ndarray, TrimStats]:
    """Count the teacher's pieces over `texts`, select `vocab_size` of them and build the trimmed tokenizer;
    returns it, the kept teacher ids (the student → teacher id map) and how the vocabulary was filled."""
    keep_ids, stats = _select(tokenizer, piece_counts(tokenizer, texts), vocab_size)
    return trim_tokenizer(tokenizer, keep_ids), keep_ids, stats
