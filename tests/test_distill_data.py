"""Distillation data: reading each format, packing invariants, the held-out split, shuffling, and exact resume."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.data import Datasets, DataStats, make_datasets, pack
from nano.documents import decode_utf8, read_documents
from nano import corpus
from nano.errors import NanoError

BOS, EOS, PAD = 2, 1, 0


def _texts(docs):
    return [d.text for d in docs]


def _write_parquet(path, values):
    pq.write_table(pa.table({"text": values, "other": list(range(len(values)))}), path)


# ---------------------------------------------------------------- reading


def test_text_file_is_one_document(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n")
    docs, skipped = read_documents([tmp_path / "a.txt"])
    assert _texts(docs) == ["def f(x):\n    return x\n"] and skipped == 0
    data = make_datasets([tmp_path / "a.txt"], tiny_tokenizer, seq_len=4, batch_size=1, heldout_fraction=0)
    expected = [BOS] + tiny_tokenizer.encode("def f(x):\n    return x\n") + [EOS]
    assert data.train.stream[:data.train.length].tolist() == expected
    assert (data.stats.documents, data.stats.tokens) == (1, len(expected))


def test_directory_reads_every_supported_file_recursively(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("gamma = 1")
    (tmp_path / "d.jsonl").write_text('{"text": "delta"}\n\n{"text": "epsilon", "id": 5}\n')
    _write_parquet(tmp_path / "sub" / "e.parquet", ["zeta", None, "eta"])
    (tmp_path / "f.csv").write_text("ignored")
    (tmp_path / ".git" / "g.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("")
    docs, _ = read_documents([tmp_path])
    assert _texts(docs) == ["alpha", "delta", "epsilon", "# beta", "gamma = 1", "zeta", "eta"]


def test_jsonl_and_parquet_files(tmp_path):
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    _write_parquet(tmp_path / "y.parquet", [f"row {i}" for i in range(4)])
    docs, _ = read_documents([tmp_path / "x.jsonl", tmp_path / "y.parquet"])
    assert _texts(docs) == [f"doc {i}" for i in range(5)] + [f"row {i}" for i in range(4)]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(NanoError, match=r"bad\.jsonl:3: not valid JSON"):
        read_documents([path])
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(NanoError, match=r"bad\.jsonl:2: no 'text' string field"):
        read_documents([path])


def test_parquet_without_text_column_is_refused(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(NanoError, match="no 'text' column"):
        read_documents([tmp_path / "p.parquet"])


def test_undecodable_bytes_are_counted_and_skipped(tmp_path, tiny_tokenizer):
    assert decode_utf8(b"ab\xffcd\xfe\xfd\xc3\xa9") == ("abcdé", 3)
    assert decode_utf8("é€😀".encode()) == ("é€😀", 0)
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 \xff\xfeok")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\x80y"}\n')
    _write_parquet(tmp_path / "c.parquet", [b"bin\xffary"])
    docs, skipped = read_documents([tmp_path])
    assert _texts(docs) == ["café ok", "xy", "binary"] and skipped == 4
    data = make_datasets([tmp_path], tiny_tokenizer, seq_len=4, batch_size=1, heldout_fraction=0)
    assert data.stats.skipped_bytes == 4


def test_stdlib_keeps_the_corpus_split(tiny_tokenizer):
    data = make_datasets(["stdlib"], tiny_tokenizer, seq_len=512, batch_size=4, heldout_fraction=0.5)
    non_empty = [p for p in corpus.corpus_files("heldout") if p.stat().st_size]
    assert data.stats.heldout_documents == len(non_empty)
    assert data.stats.documents == len([p for p in corpus.corpus_files("train") if p.stat().st_size])


# ---------------------------------------------------------------- packing


def _doc_ids(lengths):
    return np.repeat(np.arange(len(lengths)), lengths)


@pytest.mark.parametrize("lengths", [[5, 3, 17, 2, 8, 4], [8, 8, 8], [9], [3, 5]])
def test_packing_invariants(lengths):
    seq_len = 8
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    docs = [[BOS] + list(range(100 + s + 1, 100 + s + n - 1)) + [EOS] for s, n in zip(start, lengths)]
    stream = np.concatenate(docs)
    doc = _doc_ids(lengths)
    rows = pack(docs, seq_len=seq_len, pad_id=PAD, bos_id=BOS)
    b = rows.batch(np.arange(rows.rows))
    assert all(v.shape == (rows.rows, seq_len) for v in b.values())
    real = b["segment_ids"] > 0
    g = np.arange(rows.rows)[:, None] * seq_len + np.arange(seq_len)  # global index of each input in the stream
    # a row that opens mid-document opens with BOS instead of the stream's token; every other input is the stream's,
    # each exactly once, in order (the very last token may be only a target)
    continued = real[:, 0] & (doc[g[:, 0]] == doc[np.maximum(g[:, 0] - 1, 0)]) & (g[:, 0] > 0)
    from_stream = real.copy()
    from_stream[continued, 0] = False
    assert (b["tokens"][continued, 0] == BOS).all()
    inputs = b["tokens"][from_stream]
    assert (inputs == stream[g[from_stream]]).all() and len(stream) - 1 <= real.sum() <= len(stream)
    # targets are the stream shifted by one, across row boundaries too: every token after the first is a target once
    scored = real & (g + 1 < len(stream))
    assert (b["targets"][scored] == stream[g[scored] + 1]).all()
    # a weighted target is the next token of the same document, never at a continued row's BOS
    weighted = b["weights"] > 0
    assert (doc[g[weighted]] == doc[g[weighted] + 1]).all() and not weighted[continued, 0].any()
    lost = continued & (doc[g[:, 0]] == doc[np.minimum(g[:, 0] + 1, len(doc) - 1)])  # not a document's EOS
    assert b["weights"].sum() == len(stream) - len(lengths) - lost.sum()
    # segments count 1, 2, ... per row, positions restart at each segment; padding is segment 0, weight 0
    for r in range(rows.rows):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        gi = g[r][real[r]]
        new = np.r_[True, doc[gi][1:] != doc[gi][:-1]]
        assert (seg[real[r]] == np.cumsum(new)).all()
        assert (pos[real[r]][new] == 0).all() and (np.diff(pos[real[r]])[~new[1:]] == 1).all()
        assert (b["tokens"][r][~real[r]] == PAD).all() and (b["weights"][r][~real[r]] == 0).all()
    # BOS where a document starts and where a row continues one (Gemma reads text after BOS), always at position 0
    bos_at = b["tokens"] == BOS
    assert bos_at.sum() == len(lengths) + continued.sum() and (b["positions"][bos_at] == 0).all()


def test_empty_rows_are_all_padding():
    rows = pack([[BOS, 7, 8, EOS]], seq_len=4, pad_id=PAD, bos_id=BOS)
    b = rows.batch(np.array([0, -1]))
    assert b["tokens"][1].tolist() == [PAD] * 4
    assert b["segment_ids"][1].sum() == 0 and b["weights"][1].sum() == 0


# ---------------------------------------------------------------- split, shuffle, resume


def _jsonl_corpus(tmp_path, n, words=12):
    lines = [json.dumps({"text": " ".join(f"w{i}_{j}" for j in range(words))}) for i in range(n)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    return tmp_path / "c.jsonl"


def test_heldout_split_is_disjoint_and_deterministic(tmp_path, tiny_tokenizer):
    path = _jsonl_corpus(tmp_path, 400, words=1)
    docs, _ = read_documents([path])
    a = make_datasets([path], tiny_tokenizer, seq_len=16, batch_size=2, heldout_fraction=0.2)
    b = make_datasets([path], tiny_tokenizer, seq_len=16, batch_size=2, heldout_fraction=0.2)
    assert a.stats == b.stats and np.array_equal(a.heldout.stream, b.heldout.stream)
    assert 40 < a.stats.heldout_documents < 120 and a.stats.documents + a.stats.heldout_documents == 400

    def texts(rows):
        ids = rows.stream[:rows.length]
        cuts = np.flatnonzero(rows.starts[:rows.length])
        return {tiny_tokenizer.decode(d[1:-1]) for d in np.split(ids, cuts[1:])}

    train, held = texts(a.train), texts(a.heldout)
    assert not train & held and train | held == set(_texts(docs))


def test_eval_paths_are_the_heldout_set(tmp_path, tiny_tokenizer):
    (tmp_path / "train.txt").write_text("some training text " * 20)
    (tmp_path / "eval.txt").write_text("other text")
    data = make_datasets([tmp_path / "train.txt"], tiny_tokenizer, seq_len=8, batch_size=2,
                         heldout_fraction=0.5, eval_paths=[tmp_path / "eval.txt"])
    assert (data.stats.documents, data.stats.heldout_documents) == (1, 1)
    batches = data.heldout_batches()
    assert len(batches) == 1 and batches[0]["tokens"].shape == (2, 8)
    # BOS text EOS: its pairs, less the one that opens the second row (that row starts with BOS instead)
    assert batches[0]["weights"].sum() == len(tiny_tokenizer.encode("other text")) + 1 - 1
    with pytest.raises(NanoError, match="in both the training and the eval data"):
        make_datasets([tmp_path], tiny_tokenizer, seq_len=8, batch_size=2, eval_paths=[tmp_path / "eval.txt"])


def _synthetic(rows, seq_len=4, batch_size=2, seed=0):
    """rows * seq_len + 1 distinct tokens in one document: row r's first target is r * seq_len + 1."""
    packed = pack([np.arange(rows * seq_len + 1)], seq_len=seq_len, pad_id=-1, bos_id=-2)
    return Datasets(packed, None, DataStats(1, packed.length, rows, 0, 0, 0, 0), batch_size, seed)


def _row_ids(batch, seq_len=4):
    return (batch["targets"][:, 0] // seq_len).tolist()


def test_epochs_are_permutations_with_new_orders_per_seed_and_epoch():
    data = _synthetic(rows=10, batch_size=3)
    it = data.train_iterator()
    epochs = [[r for _ in range(3) for r in _row_ids(next(it))] for _ in range(4)]
    assert all(len(set(e)) == 9 and set(e) <= set(range(10)) for e in epochs)  # one row left over each epoch
    assert len({tuple(e) for e in epochs}) == 4
    again = data.train_iterator()
    assert [r for _ in range(3) for r in _row_ids(next(again))] == epochs[0]
    other = _synthetic(rows=10, batch_size=3, seed=1).train_iterator()
    assert [r for _ in range(3) for r in _row_ids(next(other))] != epochs[0]


@pytest.mark.parametrize("before", [5, 2])  # with 3 batches an epoch, both cross an epoch boundary
def test_iterator_state_restores_the_exact_batches(before):
    data = _synthetic(rows=7, batch_size=2)
    it = data.train_iterator()
    for _ in range(before):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    for restored in (data.train_iterator(state), _synthetic(rows=7, batch_size=2).train_iterator(state)):
        for want in expected:
            got = next(restored)
            assert all(np.array_equal(got[k], want[k]) for k in want)
    assert state["batches"] == before and state["epoch"] == before // 3


def test_state_from_other_data_is_refused():
    state = _synthetic(rows=7, batch_size=2).train_iterator().get_state()
    with pytest.raises(NanoError, match="belongs to other data"):
        _synthetic(rows=7, batch_size=2, seed=3).train_iterator(state)


# ---------------------------------------------------------------- errors


def test_bad_corpora_are_refused(tmp_path, tiny_tokenizer):
    def make(paths, **kw):
        return make_datasets(paths, tiny_tokenizer, **{"seq_len": 16, "batch_size": 4, **kw})

    with pytest.raises(NanoError, match="no such file or directory"):
        make([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(NanoError, match="no training documents"):
        make([tmp_path / "empty"])
    (tmp_path / "short.txt").write_text("a short text")
    with pytest.raises(NanoError, match=r"corpus has 1 rows of 16 tokens, fewer than one batch of 4"):
        make([tmp_path / "short.txt"], heldout_fraction=0)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(NanoError, match="unsupported file type '.csv'"):
        make([tmp_path / "data.csv"])
    with pytest.raises(NanoError, match="heldout fraction"):
        make([tmp_path / "short.txt"], heldout_fraction=1.0)
