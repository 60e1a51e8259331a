"""The offline teacher cache: bit-identical to the online teacher, resumable, and refusing what does not match."""

import json
import shutil

import numpy as np
import pytest

from distill.data import make_datasets
from distill.loop import next_step_batch
from distill.teacher import OnlineTeacher
from distill.teacher_cache import CachedTeacher, cache_teacher, held_steps, shard_path
from nano.config import TINY
from nano.errors import NanoError
from nano.model import init_model

K = 16
ACCUM = 2
META = {"teacher": "tiny-seed123", "k": K, "mode": "sample", "seed": 0}


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_tokenizer):
    from hf_tiny import training_text

    corpus = tmp_path_factory.mktemp("cache_corpus") / "text.txt"
    corpus.write_text("\n".join(training_text(lines=300)))

    def datasets(**overrides):
        kw = dict(seq_len=32, batch_size=4, seed=0, heldout_fraction=0.0) | overrides
        return make_datasets([corpus], tiny_tokenizer, **kw)

    online = OnlineTeacher(init_model(TINY, seed=123), k=K, mode="sample", seed=0)
    return datasets, online


class Counting:
    """Wraps a teacher and records the steps it was asked for."""

    def __init__(self, teacher):
        self.teacher, self.steps = teacher, []

    def __call__(self, batch, step):
        self.steps.append(step)
        return self.teacher(batch, step)


def _refuse(batch, step):
    raise AssertionError(f"teacher must not run (asked for step {step})")


@pytest.fixture(scope="module")
def cache3(setting, tmp_path_factory):
    """A 3-step cache with grad_accum 2, shared by the read-only tests."""
    datasets, online = setting
    out = tmp_path_factory.mktemp("cache3")
    info = cache_teacher(out, datasets(), online, steps=3, grad_accum=ACCUM, meta=META)
    return out, info


def _step_batches(data, steps, accum=ACCUM):
    it = data.train_iterator()
    return [next_step_batch(it, accum) for _ in range(steps)]


def test_round_trip_is_bit_identical_to_online_teacher(setting, cache3):
    datasets, online = setting
    out, info = cache3
    data = datasets()
    cached = CachedTeacher(out, datasets=data, grad_accum=ACCUM, k=K)
    for step, batch in enumerate(_step_batches(data, 3)):
        want, got = online(batch, step), cached(batch, step)
        assert got["teacher_ids"].shape == (ACCUM, 4, 32, K)
        assert got["teacher_ids"].dtype == np.int32 and got["teacher_logprobs"].dtype == np.float32
        np.testing.assert_array_equal(got["teacher_ids"], np.asarray(want["teacher_ids"]))
        np.testing.assert_array_equal(got["teacher_logprobs"], np.asarray(want["teacher_logprobs"]))
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
    # Different steps hold different distributions (the cache is not one shard repeated).
    s0, s1 = np.load(shard_path(out, 0)), np.load(shard_path(out, 1))
    assert not np.array_equal(s0["tokens"], s1["tokens"])
    assert not np.array_equal(s0["teacher_logprobs"], s1["teacher_logprobs"])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"format": 1, "data_fingerprint": data.fingerprint, "batch_size": 4, "seq_len": 32,
                        "grad_accum": ACCUM, "k": K, "meta": META}
    assert (info.directory, info.steps, info.computed) == (out, 3, 3)
    assert info.tokens == 3 * ACCUM * 4 * 32
    assert info.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert info.bytes > 3 * ACCUM * 4 * 32 * K * 8  # ids + logprobs are on disk, uncompressed


def test_resume_computes_only_missing_steps_and_matches_one_go(setting, tmp_path):
    datasets, online = setting
    data = datasets()
    resumed, one_go = tmp_path / "resumed", tmp_path / "one_go"
    first = Counting(online)
    cache_teacher(resumed, data, first, steps=3, grad_accum=ACCUM, meta=META)
    assert first.steps == [0, 1, 2]

    # A killed run's temporary for step 3 must be neither read as that shard nor left behind.
    stray = resumed / "shards" / ".step_0000003.npz.99999.tmp"
    stray.write_bytes(b"partial")
    assert held_steps(resumed) == [0, 1, 2]

    second = Counting(online)
    info = cache_teacher(resumed, data, second, steps=5, grad_accum=ACCUM, meta=META)
    assert second.steps == [3, 4]
    assert (info.steps, info.computed) == (5, 2)
    assert not stray.exists()
    assert sorted(p.name for p in (resumed / "shards").iterdir()) == [f"step_000000{i}.npz" for i in range(5)]

    again = cache_teacher(resumed, data, _refuse, steps=5, grad_accum=ACCUM, meta=META)  # complete: no work
    assert again.computed == 0

    cache_teacher(one_go, data, online, steps=5, grad_accum=ACCUM, meta=META)
    for step in range(5):
        a, b = np.load(shard_path(resumed, step)), np.load(shard_path(one_go, step))
        assert sorted(a.files) == ["teacher_ids", "teacher_logprobs", "tokens"]
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_student_with_other_data_or_settings_is_refused(setting, cache3):
    datasets, _ = setting
    out, _ = cache3
    with pytest.raises(NanoError, match="data_fingerprint"):
        CachedTeacher(out, datasets=datasets(seed=1), grad_accum=ACCUM)
    with pytest.raises(NanoError, match=r"batch_size \(cache 4, run 2\)"):
        CachedTeacher(out, datasets=datasets(batch_size=2), grad_accum=ACCUM)
    with pytest.raises(NanoError, match=r"grad_accum \(cache 2, run 1\)"):
        CachedTeacher(out, datasets=datasets(), grad_accum=1)
    with pytest.raises(NanoError, match=r"k \(cache 16, run 8\)"):
        CachedTeacher(out, datasets=datasets(), grad_accum=ACCUM, k=8)
    with pytest.raises(NanoError, match="no teacher cache"):
        CachedTeacher(out / "nowhere", datasets=datasets(), grad_accum=ACCUM)


def test_extending_with_other_settings_is_refused(setting, cache3):
    datasets, _ = setting
    out, _ = cache3
    before = held_steps(out)
    with pytest.raises(NanoError, match=r"\bk, meta\.k differ"):
        cache_teacher(out, datasets(), _refuse, steps=4, grad_accum=ACCUM, meta={**META, "k": 8})
    with pytest.raises(NanoError, match="meta.mode differ"):
        cache_teacher(out, datasets(), _refuse, steps=4, grad_accum=ACCUM, meta={**META, "mode": "top"})
    with pytest.raises(NanoError, match="data_fingerprint, batch_size differ"):
        cache_teacher(out, datasets(batch_size=2), _refuse, steps=4, grad_accum=ACCUM, meta=META)
    assert held_steps(out) == before


def test_step_beyond_cache_names_held_steps(setting, cache3):
    datasets, _ = setting
    out, _ = cache3
    cached = CachedTeacher(out, datasets=datasets(), grad_accum=ACCUM)
    batch = _step_batches(datasets(), 1)[0]
    with pytest.raises(NanoError, match=r"no step 3 \(it holds steps 0\.\.2\).*--steps N` with N > 3"):
        cached(batch, 3)


def test_tokens_mismatch_is_refused(setting, cache3):
    datasets, _ = setting
    out, _ = cache3
    cached = CachedTeacher(out, datasets=datasets(), grad_accum=ACCUM)
    batches = _step_batches(datasets(), 2)
    cached(batches[1], 1)  # the right batch passes
    with pytest.raises(NanoError, match="other tokens"):
        cached(batches[0], 1)  # step 0's batch at step 1: the data order differs
    tampered = {**batches[1], "tokens": batches[1]["tokens"].copy()}
    tampered["tokens"][1, 3, 7] += 1
    with pytest.raises(NanoError, match="other tokens"):
        cached(tampered, 1)


def test_corrupt_shard_is_refused_naming_the_file(setting, cache3, tmp_path):
    datasets, _ = setting
    out = tmp_path / "copy"
    shutil.copytree(cache3[0], out)
    path = shard_path(out, 1)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    cached = CachedTeacher(out, datasets=datasets(), grad_accum=ACCUM)
    batches = _step_batches(datasets(), 2)
    cached(batches[0], 0)  # the intact shard still reads
    with pytest.raises(NanoError, match=r"step_0000001\.npz is corrupt"):
        cached(batches[1], 1)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(NanoError, match=r"step_0000001\.npz is corrupt"):
        cached(batches[1], 1)
