"""Evaluator on `tiny`: every number checked against float64 numpy computed from the models' full logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nano import evaluate as ev
from distill.data import make_datasets
from nano.config import TINY
from nano.errors import NanoError
from nano.model import init_model
from nano.scoring import fold_to_student, kl_from_logits


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, tiny_tokenizer):
    from hf_tiny import training_text

    root = tmp_path_factory.mktemp("eval")
    lines = training_text(lines=260)
    (root / "train.txt").write_text("\n".join(lines[:200]))
    held = []
    for i in range(3):  # three documents: boundaries and a part-filled last batch give weight-0 positions
        held.append(root / f"heldout{i}.txt")
        held[-1].write_text("\n".join(lines[200 + 20 * i:220 + 20 * i]))
    data = make_datasets([root / "train.txt"], tiny_tokenizer, seq_len=32, batch_size=4, eval_paths=held)
    return data.heldout_batches()


@pytest.fixture(scope="module")
def models():
    return init_model(TINY, seed=1), init_model(TINY, seed=2)


def _log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(student, teacher, batches):
    """Weighted mean NLL, top-1 agreement and KL(teacher‖student) in float64 numpy."""
    nll = agree = kl = total = 0.0
    for b in batches:
        def logp(model):
            logits, _ = model(b["tokens"], b["positions"], segment_ids=b["segment_ids"])
            return _log_softmax(logits)

        w = b["weights"].astype(np.float64)
        q = logp(student)
        nll += -(w * np.take_along_axis(q, b["targets"][..., None], -1)[..., 0]).sum()
        p = logp(teacher)
        agree += (w * (q.argmax(-1) == p.argmax(-1))).sum()
        kl += (w * (np.exp(p) * (p - q)).sum(-1)).sum()
        total += w.sum()
    return nll / total, agree / total, kl / total, total


def test_heldout_set_has_padding(heldout):
    # the padding test below only means something if weight-0 positions exist in the set
    weights = np.concatenate([b["weights"].ravel() for b in heldout])
    assert (weights == 0).any() and (weights == 1).any()


def test_matches_numpy_reference(heldout, models):
    student, teacher = models
    nll, agree, kl, tokens = _reference(student, teacher, heldout)
    got = ev.Evaluator(heldout, teacher_model=teacher)(student)
    assert got["heldout_tokens"] == int(tokens)
    np.testing.assert_allclose(got["heldout_nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(got["heldout_ppl"], math.exp(nll), rtol=1e-5)
    np.testing.assert_allclose(got["teacher_student_top1"], agree, rtol=1e-6)
    np.testing.assert_allclose(got["kl_teacher_student"], kl, rtol=1e-4)
    assert kl > 1e-3 and 0 < agree < 1  # two random inits really differ, so the checks above have teeth


def test_without_teacher_reports_only_heldout(heldout, models):
    student, teacher = models
    nll, *_ = _reference(student, teacher, heldout)
    got = ev.Evaluator(heldout)(student)
    assert set(got) == {"heldout_ppl", "heldout_nll", "heldout_tokens"}
    np.testing.assert_allclose(got["heldout_ppl"], math.exp(nll), rtol=1e-5)


def test_student_against_itself(heldout, models):
    student, _ = models
    got = ev.Evaluator(heldout, teacher_model=student)(student)
    assert got["teacher_student_top1"] == 1.0
    assert abs(got["kl_teacher_student"]) < 1e-5


def test_padding_rows_and_chunking_do_not_change_result(heldout, models):
    student, teacher = models
    base = ev.Evaluator(heldout, teacher_model=teacher)(student)
    rng = np.random.default_rng(0)
    padded = []
    for b in heldout:  # two extra rows of random tokens with weight 0
        extra = {k: np.concatenate([v, rng.integers(1, TINY.vocab_size, (2, v.shape[1])).astype(v.dtype)])
                 for k, v in b.items()}
        extra["weights"][-2:] = 0.0
        padded.append(extra)
    # 1-row chunks: exercises lax.map over several chunks as a large vocabulary would
    got = ev.Evaluator(padded, teacher_model=teacher, max_chunk_elements=32 * TINY.vocab_size)(student)
    assert got["heldout_tokens"] == base["heldout_tokens"]
    for key in ("heldout_nll", "teacher_student_top1", "kl_teacher_student"):
        np.testing.assert_allclose(got[key], base[key], rtol=1e-5, err_msg=key)


def test_new_params_same_graph_do_not_recompile(heldout, models):
    student, teacher = models
    evaluate = ev.Evaluator(heldout, teacher_model=teacher)
    first = evaluate(student)
    compiled = ev._batch_sums._cache_size()
    other = init_model(TINY, seed=3)  # same structure, other parameters
    second = evaluate(other)
    assert ev._batch_sums._cache_size() == compiled  # params are arguments, not constants in the program
    nll, *_ = _reference(other, teacher, heldout)
    np.testing.assert_allclose(second["heldout_nll"], nll, rtol=1e-5)
    assert second["heldout_nll"] != first["heldout_nll"]


def test_rows_per_chunk():
    assert ev._rows_per_chunk(8, 128, 262144, 2 ** 26) == 2
    assert ev._rows_per_chunk(8, 32, 512, 2 ** 26) == 8
    assert ev._rows_per_chunk(6, 10, 10, 400) == 3  # largest divisor of 6 within the budget
    assert ev._rows_per_chunk(8, 128, 262144, 1) == 1  # never below one row


def test_empty_or_unweighted_heldout_is_refused(heldout, models):
    with pytest.raises(NanoError, match="no held-out batches"):
        ev.Evaluator([])
    zero = [{**b, "weights": np.zeros_like(b["weights"])} for b in heldout[:1]]
    with pytest.raises(NanoError, match="no scored tokens"):
        ev.Evaluator(zero)(models[0])


def test_kl_of_a_folded_teacher_with_pieces_it_never_predicts_is_finite():
    """A trimmed vocabulary's piece that no teacher piece folds onto has teacher log-prob −inf (fold_to_student):
    its term is 0 (0 · −inf would be NaN, as `make distill`'s evaluation once printed)."""
    teacher = fold_to_student(jnp.asarray([[2.0, 0.5, -1.0, 1.0]]), jnp.asarray([0, 2, 2, -1]), size=4)
    assert np.isneginf(np.asarray(teacher)[0, [1, 3]]).all()
    student = jnp.asarray([[0.3, -0.2, 1.1, 0.4]])
    p = np.exp(np.asarray(teacher, np.float64)[0, [0, 2]])
    q = np.asarray(jax.nn.log_softmax(student), np.float64)[0, [0, 2]]
    expected = float(np.sum(p * (np.log(p) - q)))
    np.testing.assert_allclose(float(kl_from_logits(teacher, student)[0]), expected, rtol=1e-5)
