"""The SentencePiece tokenizer: loaded from `tokenizer.model`, or rebuilt from a GGUF file's metadata.

A student's vocabulary is its teacher's or a subset of it (`nano prune --vocab-size`), never another tokenizer:
`ids_in` maps a student's ids onto its teacher's.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from nano.errors import NanoError

# GGUF token types share SentencePiece's numbering (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5,
# BYTE=6); only the values are checked here.
_USER_DEFINED = 4
_SPM_TYPES = {1, 2, 3, 4, 5, 6}


class Tokenizer:
    """Text ↔ ids. `encode` adds no BOS: callers decide where sequences start."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise NanoError(f"missing tokenizer: {path}") from None
        except RuntimeError as e:  # sentencepiece's parse failure
            raise NanoError(f"{path} is not a SentencePiece model ({e})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS, and Gemma's end-of-turn marker where the vocabulary has one."""
        end_of_turn = self.sp.piece_to_id("<end_of_turn>")
        return (self.eos_id,) if end_of_turn == self.sp.unk_id() else (self.eos_id, end_of_turn)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def ids_in(self, teacher: "Tokenizer") -> np.ndarray:
        """[vocab] int32: each of this tokenizer's ids as an id of `teacher`'s vocabulary, which must hold every one
        of its pieces (a student's vocabulary is its teacher's or a subset of it, never another tokenizer)."""
        if self.proto == teacher.proto:
            return np.arange(self.vocab_size, dtype=np.int32)
        ids = np.array([teacher.sp.piece_to_id(self.sp.id_to_piece(i)) for i in range(self.vocab_size)], np.int32)
        unknown = np.flatnonzero((ids == teacher.sp.unk_id()) & (np.arange(self.vocab_size) != self.sp.unk_id()))
        if unknown.size:
            raise NanoError(f"the student's vocabulary is not a subset of the teacher's: {unknown.size} of its pieces "
                            f"(e.g. {self.sp.id_to_piece(int(unknown[0]))!r}) are not the teacher's")
        return ids

    def first_pieces_of(self, teacher: "Tokenizer") -> np.ndarray:
        """[teacher vocab] int32: for each of `teacher`'s ids, the id of this vocabulary's piece that begins the
        piece's text as this tokenizer spells it: the piece itself where this vocabulary kept it, else the first
        piece of its spelling (a dropped "▁foobar" begins "▁foo" "bar"), −1 for a dropped control or unused piece,
        which spells nothing. A teacher's probability of a dropped piece is thereby a probability of the student's
        next piece: what a student with this vocabulary learns from it."""
        out = np.full(teacher.vocab_size, -1, np.int32)
        out[self.ids_in(teacher)] = np.arange(self.vocab_size, dtype=np.int32)
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(teacher.proto)
        spelled = (sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
        dropped = [i for i in np.flatnonzero(out < 0).tolist() if proto.pieces[i].type in spelled]
        texts = [proto.pieces[i].piece.replace("▁", " ") for i in dropped]
        for i, ids in zip(dropped, self.sp.encode(texts)):
            out[i] = ids[0]
        return out

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """[vocab] int32: the UTF-8 bytes each id stands for inside a text ('▁' is a space, a byte piece is one byte,
        control pieces none), so a text's byte length is the sum over its ids: what bits per byte divide by."""
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(self.proto)
        out = np.zeros(len(proto.pieces), np.int32)
        for i, piece in enumerate(proto.pieces):
            if piece.type == sp_pb2.ModelProto.SentencePiece.BYTE:
                out[i] = 1
            elif piece.type in (sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED):
                out[i] = len(piece.piece.replace("▁", " ").encode("utf-8"))
        return out


@dataclasses.dataclass(frozen=True)
class TrimmedVocab:
    """A student's trimmed vocabulary inside its teacher's: `teacher_ids` [student vocab], each student id as the
    teacher's (how the teacher reads the student's tokens); `first_pieces` [teacher vocab], each teacher id as the
    student piece its text begins with (how the teacher's probabilities become the student's; see
    `Tokenizer.first_pieces_of`)."""

    teacher_ids: np.ndarray
    first_pieces: np.ndarray

    @classmethod
    def of(cls, student: Tokenizer, teacher: Tokenizer) -> "TrimmedVocab | None":
        """None when the two share one vocabulary."""
        if student.proto == teacher.proto:
            return None
        return cls(student.ids_in(teacher), student.first_pieces_of(teacher))


def _string_array(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _scalar_array(field) -> np.ndarray:
    return np.array([field.parts[i][0] for i in field.data])


def tokenizer_from_gguf(reader) -> Tokenizer:
    """Rebuild the SentencePiece model of a Gemma-style ('llama' tokenizer) GGUF.

    Settings that reproduce llama.cpp's ids: BPE with byte fallback, identity normaliser (no NFKC), no dummy
    prefix, whitespace kept as is, digits split. GGUF stores user-defined pieces with ' ' where SentencePiece
    wants '▁', so those get it back.
    """
    fields = reader.fields
    model = fields.get("tokenizer.ggml.model")
    if model is None or model.contents() != "llama":
        found = None if model is None else model.contents()
        raise NanoError(f"GGUF tokenizer is {found!r}; only SentencePiece ('llama') tokenizers can be rebuilt")
    try:
        pieces = _string_array(fields["tokenizer.ggml.tokens"])
        scores = _scalar_array(fields["tokenizer.ggml.scores"]).astype(np.float32)
        types = _scalar_array(fields["tokenizer.ggml.token_type"]).astype(int)
    except KeyError as e:
        raise NanoError(f"GGUF has no tokenizer field {e.args[0]}") from None
    if not (len(pieces) == len(scores) == len(types)) or not set(types.tolist()) <= _SPM_TYPES:
        raise NanoError("GGUF tokenizer tokens, scores and types disagree")

    def special_id(name, default):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        return int(field.contents()) if field is not None else default

    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        if kind == _USER_DEFINED:
            piece = piece.replace(" ", "▁")
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    # SentencePiece finds its special ids by piece name, so both the ids and the names are set.
    for name, default in (("unk", 3), ("bos", 2), ("eos", 1), ("pad", 0)):
        i = special_id("unknown" if name == "unk" else "padding" if name == "pad" else name, default)
        setattr(t, f"{name}_id", i)
        setattr(t, f"{name}_piece", pieces[i])
    proto.pieces[t.unk_id].type = sp_pb2.ModelProto.SentencePiece.UNKNOWN  # GGUF marks it CONTROL
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return Tokenizer(proto.SerializeToString())
