"""Trimming a SentencePiece BPE vocabulary (prune/vocab.py), on the tiny test tokenizer and the real teacher's.

What is checked against SentencePiece itself: the trimmed model loads, round-trips any text (characters it no
longer has go through `<0xNN>` byte pieces), gives the teacher's ids on text the kept pieces cover, and reaches
every piece it keeps (the merge-path property; a top-k cut without merge paths fails it).
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from hf_tiny import training_text
from nano.errors import NanoError
from nano.tokenizer import Tokenizer
from prune.vocab import (piece_counts, select_pieces, teacher_to_student, trim_tokenizer, trim_vocabulary)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"

MIXED = ("Привет, мир! Съешь же ещё этих мягких французских булок. 你好，世界。我们今天学习分词。 "
         "مرحبا بالعالم، كيف حالك؟ नमस्ते दुनिया, आप कैसे हैं? Ça déjà vu, naïve façade, Ångström, Øresund. "
         "Emoji: 🙂🚀👩‍👩‍👧 🧪 ✔️ — “quotes” … ¿qué? 𝔹𝕠𝕝𝕕 ᚠᛇᚻ ꙮ\n"
         "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2, 3]}\n\n\n\n    # four spaces, then a tab\t<b>bold</b>\r\n"
         "control \x00\x01\x7f and private use \ue000\U0010fffd end")
STDLIB = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "json/encoder.py", "json/decoder.py", "csv.py",
          "fnmatch.py", "shlex.py", "colorsys.py"]


def _model(tokenizer: Tokenizer) -> sp_pb2.ModelProto:
    return sp_pb2.ModelProto.FromString(tokenizer.proto)


def _raw_processor(tokenizer: Tokenizer) -> spm.SentencePieceProcessor:
    """The same BPE model behind an identity normaliser with no dummy prefix, so a piece's text encodes as is."""
    model = _model(tokenizer)
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.precompiled_charsmap = b""
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def _required(model: sp_pb2.ModelProto) -> set[int]:
    """Specials but Gemma's `<unused…>` placeholders, unknown, user-defined, byte pieces, and the space '▁'."""
    return {i for i, p in enumerate(model.pieces)
            if p.type in (UNKNOWN, USER_DEFINED, BYTE) or p.piece == SPACE
            or (p.type == CONTROL and not re.fullmatch(r"<unused\d+>", p.piece))}


def _unreachable(tokenizer: Tokenizer) -> list[str]:
    """Kept NORMAL pieces that the tokenizer does not produce when encoding the piece's own text."""
    model = _model(tokenizer)
    normal = [(i, p.piece) for i, p in enumerate(model.pieces) if p.type == NORMAL]
    encoded = _raw_processor(tokenizer).encode([piece for _, piece in normal])
    return [piece for (i, piece), ids in zip(normal, encoded) if ids != [i]]


def _lines_matching(teacher: Tokenizer, trimmed: Tokenizer, keep_ids, lines) -> tuple[int, float]:
    """Among lines whose teacher ids are all kept: how many, and the fraction of token positions where the
    trimmed tokenizer's ids, mapped to teacher ids, equal the teacher's."""
    kept = set(np.asarray(keep_ids).tolist())
    equal = total = used = 0
    for line, ids, mine in zip(lines, teacher.sp.encode(lines), trimmed.sp.encode(lines)):
        if not ids or not set(ids) <= kept:
            continue
        used += 1
        mapped = np.asarray(keep_ids)[mine].tolist()
        total += len(ids)
        equal += sum(a == b for a, b in zip(mapped, ids)) if len(mapped) == len(ids) else 0
    return used, equal / max(total, 1)


@pytest.fixture(scope="module")
def teacher_tok(teacher_dir) -> Tokenizer:
    return Tokenizer.load(Path(teacher_dir) / "tokenizer.model")


@pytest.fixture(scope="module")
def calibration() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in STDLIB]


@pytest.fixture(scope="module")
def teacher_4k(teacher_tok, calibration):
    return trim_vocabulary(teacher_tok, calibration, 4096)


@pytest.fixture(scope="module")
def tiny_400(tiny_tokenizer):
    return trim_vocabulary(tiny_tokenizer, training_text(lines=300), 400)


def test_piece_counts_match_per_text_encoding(teacher_tok, calibration):
    counts = piece_counts(teacher_tok, iter(calibration))
    expected = np.bincount(np.concatenate([teacher_tok.encode(t) for t in calibration]),
                           minlength=teacher_tok.vocab_size)
    assert counts.dtype == np.int64 and counts.shape == (262_144,)
    np.testing.assert_array_equal(counts, expected)


def test_teacher_trim_round_trips_any_text(teacher_tok, teacher_4k):
    trimmed, keep_ids, _ = teacher_4k
    ids = trimmed.encode(MIXED)
    assert trimmed.decode(ids) == MIXED
    # Characters the trimmed vocabulary lost (Chinese, Devanagari, ...) went through byte pieces.
    assert "你" not in {trimmed.id_to_piece(i) for i in range(trimmed.vocab_size)}
    assert sum(_model(trimmed).pieces[i].type == BYTE for i in ids) > 100
    every_byte = "".join(chr(c) for c in range(1, 256)) + "\x00"
    assert trimmed.decode(trimmed.encode(every_byte)) == every_byte
    assert len(ids) > len(teacher_tok.encode(MIXED))  # the price of the smaller vocabulary


def test_tiny_trim_round_trips_like_the_original(tiny_tokenizer, tiny_400):
    trimmed, _, _ = tiny_400
    # The tiny model normalises (NFKC, collapsed whitespace), so the trimmed one must give what the original gives.
    assert trimmed.decode(trimmed.encode(MIXED)) == tiny_tokenizer.decode(tiny_tokenizer.encode(MIXED))
    stable = "Kalo mine the quick brown fox, привет 你好 مرحبا नमस्ते déjà 🙂 42!"
    assert trimmed.decode(trimmed.encode(stable)) == stable


def test_teacher_ids_on_fully_covered_calibration_text(teacher_tok, calibration):
    # Big enough to keep every piece the calibration text uses: then the trimmed ids are the teacher's, mapped.
    trimmed, keep_ids, stats = trim_vocabulary(teacher_tok, calibration, 8192)
    assert stats.coverage == 1.0
    lines = "".join(calibration).splitlines(keepends=True)
    used, fraction = _lines_matching(teacher_tok, trimmed, keep_ids, lines)
    assert used == sum(1 for line in lines if line) and fraction == 1.0
    whole = calibration[0]
    np.testing.assert_array_equal(keep_ids[trimmed.encode(whole)], teacher_tok.encode(whole))


def test_teacher_ids_on_lines_made_of_kept_pieces(teacher_tok, calibration, teacher_4k):
    trimmed, keep_ids, stats = teacher_4k
    assert 0.9 < stats.coverage < 1.0  # 4,096 pieces do not cover all of it
    used, fraction = _lines_matching(teacher_tok, trimmed, keep_ids, "".join(calibration).splitlines())
    assert used > 1000 and fraction == 1.0


def test_tiny_ids_on_lines_made_of_kept_pieces(tiny_tokenizer, tiny_400):
    trimmed, keep_ids, _ = tiny_400
    used, fraction = _lines_matching(tiny_tokenizer, trimmed, keep_ids, training_text(lines=300))
    assert used > 10 and fraction == 1.0


def test_every_kept_piece_is_reachable(teacher_tok, calibration, teacher_4k, tiny_400):
    for trimmed in (teacher_4k[0], tiny_400[0]):
        assert _unreachable(trimmed) == []
    # The check can fail: the most frequent pieces without their merge paths leave many unreachable.
    required = _required(_model(teacher_tok))
    counts = piece_counts(teacher_tok, calibration)
    by_count = [i for i in np.argsort(-counts, kind="stable").tolist() if i not in required]
    top_k = np.array(sorted(required | set(by_count[: 4096 - len(required)])))
    assert len(_unreachable(trim_tokenizer(teacher_tok, top_k))) > 100


def test_teacher_trim_structure(teacher_tok, calibration, teacher_4k):
    trimmed, keep_ids, stats = teacher_4k
    teacher, model = _model(teacher_tok), _model(trimmed)
    required = _required(teacher)
    assert trimmed.vocab_size == len(keep_ids) == 4096 and model.trainer_spec.vocab_size == 4096
    assert np.all(np.diff(keep_ids) > 0)
    assert required <= set(keep_ids.tolist()) and stats.required == len(required) == 429
    assert stats.required + stats.counted + stats.merge_path + stats.filled == 4096
    assert not any(p.piece.startswith("<unused") for p in model.pieces)
    for sid, tid in enumerate(keep_ids.tolist()):
        assert (model.pieces[sid].piece, model.pieces[sid].score, model.pieces[sid].type) == (
            teacher.pieces[tid].piece, teacher.pieces[tid].score, teacher.pieces[tid].type)
    assert (trimmed.pad_id, trimmed.eos_id, trimmed.bos_id, trimmed.sp.unk_id()) == (0, 1, 2, 3)
    spec = model.trainer_spec
    assert (spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id) == (0, 1, 2, 3)
    assert [trimmed.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert keep_ids[list(trimmed.stop_ids)].tolist() == list(teacher_tok.stop_ids)
    inverse = teacher_to_student(keep_ids, teacher_tok.vocab_size)
    assert np.sum(inverse >= 0) == 4096 and np.all(inverse[keep_ids] == np.arange(4096))
    # The most used pieces are kept, and coverage is what the counts say.
    counts = piece_counts(teacher_tok, calibration)
    top = np.argsort(-counts, kind="stable")[:1000]
    assert set(top.tolist()) <= set(keep_ids.tolist())
    assert stats.coverage == pytest.approx(counts[keep_ids].sum() / counts.sum())


@pytest.mark.parametrize("vocab_size", [261, 262, 400, 511, 512])
def test_tiny_exact_size_with_fill(tiny_tokenizer, vocab_size):
    few = piece_counts(tiny_tokenizer, training_text(lines=5))
    for counts in (few, np.zeros_like(few)):
        keep_ids = select_pieces(tiny_tokenizer, counts, vocab_size)
        assert len(keep_ids) == len(set(keep_ids.tolist())) == vocab_size
        trimmed = trim_tokenizer(tiny_tokenizer, keep_ids)
        assert trimmed.vocab_size == vocab_size and _unreachable(trimmed) == []
        assert trimmed.decode(trimmed.encode("kalo the mine")) == "kalo the mine"


def _refused(call, *words) -> str:
    with pytest.raises(NanoError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_refusals(teacher_tok, tiny_tokenizer, teacher_4k):
    counts = np.zeros(teacher_tok.vocab_size, np.int64)
    _refused(lambda: select_pieces(teacher_tok, counts, 428), "428", "429")
    _refused(lambda: select_pieces(teacher_tok, counts, 262_145), "262145")
    _refused(lambda: select_pieces(teacher_tok, counts[:-1], 4096), "262143", "262144")
    tiny_counts = np.zeros(tiny_tokenizer.vocab_size, np.int64)
    _refused(lambda: select_pieces(tiny_tokenizer, tiny_counts, 260), "260", "261")
    _refused(lambda: select_pieces(tiny_tokenizer, tiny_counts, 513), "513")
    keep_ids = teacher_4k[1]
    _refused(lambda: trim_tokenizer(teacher_tok, keep_ids[keep_ids != 3]), "unk")
    a_byte = next(i for i, p in enumerate(_model(teacher_tok).pieces) if p.type == BYTE)
    _refused(lambda: trim_tokenizer(teacher_tok, keep_ids[keep_ids != a_byte]), "byte")
    _refused(lambda: trim_tokenizer(teacher_tok, keep_ids[::-1]), "increasing")
    space = teacher_tok.sp.piece_to_id(SPACE)
    _refused(lambda: trim_tokenizer(teacher_tok, keep_ids[keep_ids != space]), "space")


def test_why_the_space_piece_is_required(tiny_tokenizer):
    # SentencePiece itself: a model without '▁' encodes spaces as bytes, and decodes them as a literal '▁'.
    model = _model(tiny_tokenizer)
    space = tiny_tokenizer.sp.piece_to_id(SPACE)
    assert model.pieces[space].piece == SPACE
    del model.pieces[space]
    model.trainer_spec.vocab_size -= 1
    without = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    assert without.decode(without.encode("1 2")) == SPACE + "1" + SPACE + "2"  # '▁' from the dummy prefix too
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("1 2")) == "1 2"


def _piece_starts(tokenizer: Tokenizer, text: str) -> dict[int, int]:
    """{character offset: id} of the pieces `tokenizer` spells `text` with."""
    return {p.begin: p.id for p in tokenizer.sp.encode(text, return_type="proto").pieces}


@pytest.mark.slow
def test_first_pieces_are_how_the_student_spells_dropped_pieces(teacher_tok, teacher_4k):
    """A teacher piece the student dropped maps to the student piece its text begins with. The reason for it: in
    running text the student's piece at the place where the teacher's dropped one starts is that piece (so the
    teacher's probability of the dropped piece is a probability of the student's next piece)."""
    trimmed, keep_ids, _ = teacher_4k
    first = trimmed.first_pieces_of(teacher_tok)
    assert first.shape == (teacher_tok.vocab_size,)
    np.testing.assert_array_equal(first[keep_ids], np.arange(len(keep_ids)))
    model = _model(teacher_tok)
    unused = [i for i, p in enumerate(model.pieces) if re.fullmatch(r"<unused\d+>", p.piece)]
    assert (first == -1).sum() == len(unused) > 6000 and np.all(first[unused] == -1)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")  # not calibration
    kept = set(keep_ids.tolist())
    teacher_at, student_at = _piece_starts(teacher_tok, text), _piece_starts(trimmed, text)
    dropped = [(at, i) for at, i in teacher_at.items() if i not in kept]
    same = sum(student_at.get(at) == first[i] for at, i in dropped)
    assert len(dropped) > 500 and same / len(dropped) > 0.99  # measured: 1,280 of 1,284
    student = _model(trimmed)

    def spelled(piece):  # the UTF-8 bytes a piece stands for
        return bytes([int(piece.piece[3:5], 16)]) if piece.type == BYTE else piece.piece.encode()

    for i in np.flatnonzero(first >= 0)[::997]:  # the student piece spells a prefix of the teacher's
        assert spelled(model.pieces[i]).startswith(spelled(student.pieces[first[i]]))
