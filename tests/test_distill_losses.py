"""Distillation losses against direct float64 numpy formulas; sparse teachers; the vocabulary-chunked path."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.losses import (SparseTeacher, distill_loss, distill_loss_from_hidden, divergence, kd_per_token,
                            sparse_from_logits, sparse_logprobs)
from nano.config import TINY
from nano.model import abstract_model
from nano.scoring import next_token_nll as token_nll

B, T, V = 2, 5, 64
DIVERGENCES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def _logits(seed, shape=(B, T, V), scale=2.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def _batch(seed=0, vocab=V):
    student, teacher = _logits(seed, (B, T, vocab)), _logits(seed + 100, (B, T, vocab), scale=3.0)
    targets = jax.random.randint(jax.random.key(seed + 200), (B, T), 0, vocab)
    weights = jnp.ones((B, T)).at[1, 3:].set(0.0)  # the second sequence ends early
    return student, teacher, targets, weights


# Direct float64 formulas.
def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(p, q):
    p, q = np.broadcast_arrays(p, q)
    safe = p > 0
    return np.where(safe, p * (np.log(np.where(safe, p, 1)) - np.log(np.where(safe, q, 1))), 0).sum(-1)


def _np_div(p, q, kind, beta):
    if kind == "fkl":
        return _np_kl(p, q)
    if kind == "rkl":
        return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


def _np_ce(student, targets):
    logq = _np_log_softmax(student)
    return -np.take_along_axis(logq, np.asarray(targets)[..., None], -1)[..., 0]


def _np_mean(x, weights):
    w = np.asarray(weights, np.float64)
    return (x * w).sum() / w.sum()


def _np_sparse_kd(student, teacher: SparseTeacher, kind, tau, beta):
    ids, lp = np.asarray(teacher.ids), np.asarray(teacher.logprobs, np.float64)
    p = np.exp(lp / tau)
    p = p / p.sum(-1, keepdims=True)  # renormalised over the k ids
    q_full = np.exp(_np_log_softmax(np.asarray(student, np.float64) / tau))
    q = np.take_along_axis(q_full, ids, -1)
    if kind == "fkl":
        return _np_kl(p, q)
    return _np_div(p, q / q.sum(-1, keepdims=True), kind, beta)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_full_teacher_matches_numpy(kind, beta, tau):
    student, teacher, targets, weights = _batch(1)
    alpha = 0.3
    loss, m = distill_loss(student, targets, weights, teacher, kind=kind, alpha=alpha, temperature=tau, beta=beta)
    p = np.exp(_np_log_softmax(np.asarray(teacher, np.float64) / tau))
    q = np.exp(_np_log_softmax(np.asarray(student, np.float64) / tau))
    kd = tau ** 2 * _np_mean(_np_div(p, q, kind, beta), weights)
    ce = _np_mean(_np_ce(student, targets), weights)
    _close(m["kd"], kd)
    _close(m["ce"], ce)
    _close(loss, alpha * ce + (1 - alpha) * kd)
    agree = np.argmax(teacher, -1) == np.argmax(student, -1)
    _close(m["teacher_student_top1"], _np_mean(agree, weights))
    assert float(m["tokens"]) == float(weights.sum())


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mode", ["top", "sample"])
def test_sparse_teacher_matches_numpy(kind, beta, tau, mode):
    student, teacher_logits, targets, weights = _batch(2)
    teacher = sparse_from_logits(teacher_logits, 16, mode=mode, key=jax.random.key(7))
    alpha = 0.25
    loss, m = distill_loss(student, targets, weights, teacher, kind=kind, alpha=alpha, temperature=tau, beta=beta)
    kd = tau ** 2 * _np_mean(_np_sparse_kd(student, teacher, kind, tau, beta), weights)
    ce = _np_mean(_np_ce(student, targets), weights)
    _close(m["kd"], kd)
    _close(loss, alpha * ce + (1 - alpha) * kd)
    top_teacher = np.take_along_axis(np.asarray(teacher.ids), np.argmax(teacher.logprobs, -1)[..., None], -1)[..., 0]
    _close(m["teacher_student_top1"], _np_mean(top_teacher == np.argmax(student, -1), weights))


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_divergence_is_nonnegative_and_zero_when_student_is_teacher(kind, beta):
    student, teacher, _, _ = _batch(3)
    for tau in (0.5, 2.0):
        assert float(kd_per_token(student, teacher, kind=kind, temperature=tau, beta=beta).min()) >= 0.0
        same = kd_per_token(teacher, teacher, kind=kind, temperature=tau, beta=beta)
        assert float(jnp.abs(same).max()) <= 1e-6
        everything = sparse_from_logits(teacher, V, mode="top")
        assert float(jnp.abs(kd_per_token(teacher, everything, kind=kind, temperature=tau, beta=beta)).max()) <= 1e-6
    # A sparse FKL against a matching student is the student's log-mass outside the k ids: positive, not 0.
    top = sparse_from_logits(teacher, 8, mode="top")
    fkl = kd_per_token(teacher, top, kind="fkl")
    outside = -jax.nn.logsumexp(jnp.take_along_axis(jax.nn.log_softmax(teacher), top.ids, -1), -1)
    _close(fkl, outside)


def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    student, teacher, _, _ = _batch(4)
    logp, logq = jax.nn.log_softmax(teacher), jax.nn.log_softmax(student)
    _close(divergence(logp, logq, kind="jsd", beta=0.5), divergence(logq, logp, kind="jsd", beta=0.5), 1e-6)
    # Disjoint one-hot distributions reach the bound: log 2 at β = 0.5, the binary entropy H(β) in general.
    far = jnp.array([[[30.0, -30.0, -30.0]]]), jnp.array([[[-30.0, -30.0, 30.0]]])
    for beta in (0.1, 0.5, 0.9):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert float(kd_per_token(*far, kind="jsd", beta=beta).max()) <= bound + 1e-6
        assert float(kd_per_token(student, teacher, kind="jsd", beta=beta).max()) <= bound
        _close(kd_per_token(*far, kind="jsd", beta=beta)[0, 0], bound, 1e-4)
    assert bound <= math.log(2)
    # τ² multiplies the unscaled divergence.
    targets, weights = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))
    _, m = distill_loss(student, targets, weights, teacher, kind="jsd", temperature=2.0)
    _close(m["kd"], 4.0 * kd_per_token(student, teacher, kind="jsd", temperature=2.0).mean())


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.7, 1.0, 3.0])
def test_sparse_with_every_id_equals_full(kind, beta, tau):
    student, teacher, _, _ = _batch(5)
    for mode in ("top", "sample"):
        everything = sparse_from_logits(teacher, V, mode=mode, key=jax.random.key(1))
        full = kd_per_token(student, teacher, kind=kind, temperature=tau, beta=beta)
        _close(kd_per_token(student, everything, kind=kind, temperature=tau, beta=beta), full, 2e-6)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_rest_target_merges_the_other_tokens_into_one_outcome(kind, beta):
    """rest=True: the k ids at their full-vocabulary probabilities plus one outcome for every other token, on both
    sides; equal to the float64 formula, never above the full divergence for FKL, equal to it with every id."""
    student, teacher, _, _ = _batch(8)
    top = sparse_from_logits(teacher, 8, mode="top")
    p, q = np.exp(_np_log_softmax(teacher)), np.exp(_np_log_softmax(student))
    ids = np.asarray(top.ids)

    def coarse(x):
        picked = np.take_along_axis(x, ids, -1)
        return np.concatenate([picked, 1 - picked.sum(-1, keepdims=True)], -1)

    value = kd_per_token(student, top, kind=kind, beta=beta, rest=True)
    _close(value, _np_div(coarse(p), coarse(q), kind, beta), 1e-5)
    if kind == "fkl":
        assert np.all(np.asarray(value) <= _np_div(p, q, kind, beta) + 1e-6)
    everything = sparse_from_logits(teacher, V, mode="top")
    _close(kd_per_token(student, everything, kind=kind, beta=beta, rest=True),
           kd_per_token(student, teacher, kind=kind, beta=beta), 2e-5)


@pytest.mark.slow
def test_rest_target_is_least_at_the_teacher():
    """Against a flat teacher's top 8, renormalising pulls a student that already is the teacher away from it;
    with the rest as an outcome the loss is 0 there and so is its gradient."""
    _, teacher, targets, weights = _batch(9)
    flat = teacher * 0.2
    top = sparse_from_logits(flat, 8, mode="top")
    grads = {rest: jax.grad(lambda s, r=rest: distill_loss(s, targets, weights, top, kind="fkl", rest=r)[0])(flat)
             for rest in (False, True)}
    assert float(jnp.abs(grads[True]).max()) <= 1e-6
    assert float(jnp.abs(grads[False]).max()) > 1e-3
    _close(kd_per_token(flat, top, kind="fkl", rest=True), 0.0, 1e-6)
    with pytest.raises(ValueError, match="temperature 1"):
        distill_loss(flat, targets, weights, top, kind="fkl", temperature=2.0, rest=True)


def _first_pieces(vocab, kept, seed):
    """A fold map as `Tokenizer.first_pieces_of` makes one: the `kept` teacher ids are student ids 0.., every
    other id goes to a random kept one (the piece its text begins with) or, one in eight, nowhere (−1)."""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(vocab, kept, replace=False))
    first = rng.integers(0, kept, vocab).astype(np.int32)
    first[rng.random(vocab) < 0.125] = -1
    first[keep] = np.arange(kept)
    return keep, first


def _np_fold(teacher_logits, first, size):
    """float64: the teacher's probability of each student piece, summed over the teacher pieces mapped to it."""
    p = np.exp(_np_log_softmax(np.asarray(teacher_logits, np.float64)))
    mass = np.zeros((*p.shape[:-1], size))
    for i in np.flatnonzero(first >= 0):
        mass[..., first[i]] += p[..., i]
    return mass / mass.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_trimmed_vocabulary_target_against_float64(kind, beta):
    """A student with a trimmed vocabulary (V_s of the teacher's V pieces): the teacher is its distribution over the
    student's next piece (each teacher piece's probability on the student piece it begins with, −1 pieces left out,
    renormalised); its k ids are drawn among those and given as student ids, and the rest outcome holds the
    student pieces not drawn. The loss equals the float64 formula on those (k + 1)-outcome distributions, and is
    zero for a student that is that distribution."""
    _, teacher, _, _ = _batch(11)
    keep, first = _first_pieces(V, 40, 0)
    student = _logits(12, (B, T, len(keep)))
    sparse = sparse_from_logits(teacher, 8, mode="top", id_map=first)
    ids = np.asarray(sparse.ids)
    assert ids.max() < len(keep)  # student ids
    p = _np_fold(teacher, first, len(keep))
    assert np.array_equal(np.sort(ids, -1), np.sort(np.argsort(-p, -1)[..., :8], -1))  # the top 8 of the folded
    np.testing.assert_allclose(np.exp(np.asarray(sparse.logprobs)), np.take_along_axis(p, ids, -1), rtol=1e-5)
    q = np.exp(_np_log_softmax(student))

    def coarse(x, at):
        picked = np.take_along_axis(x, at, -1)
        return np.concatenate([picked, 1 - picked.sum(-1, keepdims=True)], -1)

    _close(kd_per_token(student, sparse, kind=kind, beta=beta, rest=True),
           _np_div(coarse(p, ids), coarse(q, ids), kind, beta), 1e-4)  # values up to ~5 nats, in float32
    _close(kd_per_token(np.log(p), sparse, kind=kind, beta=beta, rest=True), 0.0, 2e-4)


@pytest.mark.slow
def test_trimmed_vocabulary_draws_are_the_same_in_chunks():
    """The online teacher's chunked walk with a fold map: the same student ids and log-probs as one pass."""
    from distill.losses import sparse_from_hidden

    rng = np.random.default_rng(8)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(512, 16)) * 2, jnp.float32)
    _, first = _first_pieces(512, 100, 8)
    head = lambda h, rows: h @ rows.T  # noqa: E731
    for mode in ("top", "sample"):
        key = jax.random.PRNGKey(5)
        want = sparse_from_logits(head(hidden, table), 16, mode=mode, key=key, id_map=first)
        got = sparse_from_hidden(hidden, head, table, 16, mode=mode, key=key, vocab_chunk=128, id_map=first)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    np.testing.assert_allclose(np.exp(sparse_from_logits(head(hidden, table), 100, mode="top", id_map=first).logprobs),
                               np.sort(_np_fold(head(hidden, table), first, 100), -1)[..., ::-1], rtol=1e-5)
    # k above the student's pieces: the ids beyond them carry log-prob -inf and are left out of every loss
    for few in (sparse_from_logits(head(hidden, table), 120, mode="top", id_map=first),
                sparse_from_hidden(hidden, head, table, 120, mode="top", vocab_chunk=256, id_map=first)):
        assert int(np.isfinite(np.asarray(few.logprobs)).sum(-1).max()) == 100 and np.asarray(few.ids).max() < 100


def test_top_k_picks_the_largest():
    teacher = _logits(6)
    top = sparse_from_logits(teacher, 10, mode="top")
    expected = np.argsort(-np.asarray(teacher), -1)[..., :10]
    assert np.array_equal(np.sort(np.asarray(top.ids), -1), np.sort(expected, -1))
    assert top.ids.dtype == jnp.int32 and top.logprobs.dtype == jnp.float32
    _close(top.logprobs, np.take_along_axis(_np_log_softmax(teacher), np.asarray(top.ids), -1))
    assert np.all(np.diff(np.asarray(top.logprobs), axis=-1) <= 0)  # largest first


@pytest.mark.slow
def test_sampled_ids_are_distinct_from_the_support_and_follow_the_teacher():
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0, 0.0])  # two ids the teacher never produces
    n = 40_000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (1, n, probs.size))
    sample = sparse_from_logits(logits, 2, mode="sample", key=jax.random.key(0))
    ids = np.asarray(sample.ids[0])
    assert np.all(ids[:, 0] != ids[:, 1]) and np.all(ids < 4)
    _close(sample.logprobs[0], np.log(probs[ids]), 1e-6)
    # The first draw is an ordinary sample; inclusion in a draw of two without replacement is
    # P(i) = p_i + Σ_{j≠i} p_j p_i / (1 − p_j). Standard errors are below 0.003.
    first = np.bincount(ids[:, 0], minlength=probs.size) / n
    included = np.bincount(ids.ravel(), minlength=probs.size) / n
    exact = np.array([p + sum(pj * p / (1 - pj) for j, pj in enumerate(probs) if j != i) for i, p in enumerate(probs)])
    assert np.abs(first - probs).max() < 0.012
    assert np.abs(included - exact).max() < 0.012
    # Asking for more ids than the support: the extra ids have log-prob -inf, and the losses stay finite.
    wide = sparse_from_logits(logits[:, :4], 5, mode="sample", key=jax.random.key(1))
    assert np.array_equal(np.sort(np.asarray(wide.ids), -1), np.broadcast_to(np.arange(5), (1, 4, 5)))
    assert np.isneginf(np.asarray(wide.logprobs)).sum() == 4


def test_renormalisation_over_the_k_ids_is_exact():
    teacher = sparse_from_logits(_logits(8), 12, mode="sample", key=jax.random.key(3))
    for tau in (0.5, 1.0, 2.0):
        p = np.exp(np.asarray(sparse_logprobs(teacher, tau), np.float64))
        _close(p.sum(-1), 1.0, 1e-6)
        expected = np.exp(np.asarray(teacher.logprobs, np.float64) / tau)
        _close(p, expected / expected.sum(-1, keepdims=True), 1e-6)
    holes = teacher.replace(logprobs=teacher.logprobs.at[..., 3:].set(-jnp.inf))
    p = np.exp(np.asarray(sparse_logprobs(holes, 2.0)))
    assert np.all(p[..., 3:] == 0) and np.allclose(p.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_zero_probability_ids_are_left_out_safely(kind, beta, tau):
    """k above the teacher's support: -inf log-probs give no NaN (loss or gradient) and equal the set without them."""
    student, _, targets, weights = _batch(9)
    teacher_logits = jnp.full((B, T, V), -jnp.inf).at[..., :3].set(_logits(10, (B, T, 3)))
    wide = sparse_from_logits(teacher_logits, 8, mode="sample", key=jax.random.key(2))
    narrow = sparse_from_logits(teacher_logits, 3, mode="top")
    assert np.isneginf(np.asarray(wide.logprobs)).sum() == B * T * 5

    def loss(s, teacher):
        return distill_loss(s, targets, weights, teacher, kind=kind, alpha=0.2, temperature=tau, beta=beta)[0]

    value, grad = jax.value_and_grad(loss)(student, wide)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    _close(value, loss(student, narrow))
    _close(grad, jax.grad(loss)(student, narrow))
    full_value, full_grad = jax.value_and_grad(lambda s: distill_loss(s, targets, weights, teacher_logits, kind=kind,
                                                                      temperature=tau, beta=beta)[0])(student)
    if kind != "rkl":  # a reverse KL against a full teacher with zeros is truly infinite; FKL and JSD are not
        assert np.isfinite(float(full_value)) and np.all(np.isfinite(np.asarray(full_grad)))


def test_padding_weights_exclude_tokens():
    student, teacher, targets, weights = _batch(11)
    sparse = sparse_from_logits(teacher, 8, mode="top")
    pad = weights == 0
    noisy = jnp.where(pad[..., None], 1e4 * _logits(12), student)  # garbage where nothing is scored
    for t in (teacher, sparse):
        for kind in ("ce", "fkl", "rkl", "jsd"):
            a = distill_loss(student, targets, weights, t, kind=kind, alpha=0.5)[0]
            b = distill_loss(noisy, jnp.where(pad, 0, targets), weights, t, kind=kind, alpha=0.5)[0]
            _close(a, b)
    loss, m = distill_loss(student, targets, jnp.zeros((B, T)), sparse, kind="fkl")
    assert float(loss) == 0.0 and float(m["tokens"]) == 0.0


def test_cross_entropy_is_the_mean_token_nll():
    student, _, _, _ = _batch(13)
    tokens = jax.random.randint(jax.random.key(14), (B, T), 0, V)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    weights = jnp.ones((B, T)).at[:, -1].set(0.0)  # the last position has no next token
    loss, m = distill_loss(student, targets, weights, kind="ce", alpha=0.7)
    expected = jnp.sum(token_nll(student, tokens) * weights) / jnp.sum(weights)
    _close(loss, expected, 1e-6)
    assert float(m["kd"]) == 0.0 and "teacher_student_top1" not in m


def _softcap_head(cap):
    def head(hidden, rows):
        logits = jnp.matmul(hidden, rows.T, preferred_element_type=jnp.float32)
        return logits if cap is None else jnp.tanh(logits / cap) * cap
    return head


@pytest.mark.slow
@pytest.mark.parametrize("vocab,chunk,cap", [(300, 64, 3.0), (256, 64, None), (96, 1000, 3.0)])
def test_chunked_equals_unchunked_values_and_gradients(vocab, chunk, cap):
    """Chunks that do not divide the vocabulary, that do, and one larger than it; with and without a softcap."""
    d, tau, alpha, kinds = 16, 1.5, 0.3, ("ce", "fkl", "rkl", "jsd")
    hidden = _logits(20, (B, T, d), scale=1.0)
    embedding = _logits(21, (vocab, d), scale=1.0)
    _, teacher_logits, targets, weights = _batch(22, vocab)
    teacher = sparse_from_logits(teacher_logits, 24, mode="sample", key=jax.random.key(4))
    head = _softcap_head(cap)

    @jax.jit  # every kind in one program: one compile per case
    def values_and_grads(hidden, embedding):
        out = {}
        for kind, rest in [(k, False) for k in kinds] + [(k, True) for k in kinds[1:]]:
            options = dict(kind=kind, alpha=alpha, temperature=1.0 if rest else tau, beta=0.3, rest=rest)
            full = lambda h, e: distill_loss(head(h, e), targets, weights, teacher, **options)  # noqa: E731
            chunked = [lambda h, e, r=remat: distill_loss_from_hidden(h, head, e, targets, weights, teacher,
                                                                      vocab_chunk=chunk, remat=r, **options)
                       for remat in (True, False)]  # chunks recomputed for the gradient, or kept
            out[kind, rest] = [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, embedding)
                         for f in (full, *chunked)]
        return out

    for kind, ((a, ma), ga), *rest in ((k, *v) for k, v in values_and_grads(hidden, embedding).items()):
        for (b, mb), gb in rest:
            _close(a, b)
            assert ma.keys() == mb.keys(), kind
            for name in ma:
                _close(ma[name], mb[name])
            for x, y in zip(ga, gb):
                assert np.all(np.isfinite(np.asarray(y))), kind
                _close(x, y)


@pytest.mark.parametrize("mode", ["sample", "top"])
def test_teacher_sparse_from_hidden_equals_from_logits(mode):
    """The online teacher walks the vocabulary in chunks: the same k ids, in the same order, and log-probs."""
    from distill.losses import sparse_from_hidden
    from nano.quant_scheme import QuantSpec
    from nano.quant import quantize_rtn

    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(512, 16)) * 2, jnp.float32)
    head = lambda h, rows: h @ rows.T  # noqa: E731
    key = jax.random.PRNGKey(3)
    want = sparse_from_logits(head(hidden, table), 32, mode=mode, key=key)
    got = jax.jit(lambda h, t: sparse_from_hidden(h, head, t, 32, mode=mode, key=key, vocab_chunk=128))(hidden, table)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    # An integer table (a quantized teacher) is sliced chunk by chunk too, codes and scales together.
    q = quantize_rtn(table, QuantSpec(4, 16, 1))
    qhead = lambda h, rows: h @ rows.dequantize().T  # noqa: E731
    want = sparse_from_logits(qhead(hidden, q), 32, mode=mode, key=key)
    got = sparse_from_hidden(hidden, qhead, q, 32, mode=mode, key=key, vocab_chunk=128)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)


def test_chunked_gradient_never_holds_full_logits():
    """XLA's own buffer plan: the chunked loss and its gradient need less scratch than one [B, T, V] float32."""
    b, t, d, vocab, chunk = 2, 32, 16, 16384, 512
    head = _softcap_head(30.0)
    teacher = SparseTeacher(ids=jnp.zeros((b, t, 8), jnp.int32), logprobs=jnp.zeros((b, t, 8)))
    targets, weights = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))

    def loss(hidden, embedding):
        return distill_loss_from_hidden(hidden, head, embedding, targets, weights, teacher, kind="jsd", alpha=0.5,
                                        temperature=2.0, vocab_chunk=chunk, remat=True)[0]

    args = jnp.ones((b, t, d)), jnp.ones((vocab, d))
    scratch = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert scratch < b * t * vocab * 4


def test_chunked_loss_with_the_model_head():
    """The decoder's own softcapped `head`, applied to chunks of embedding rows, gives the loss of its full logits.

    `head(hidden, rows)` reads only the config, so an abstract model (nothing allocated) has the real head."""
    config = dataclasses.replace(TINY, final_logit_softcap=5.0)
    head = abstract_model(config).head
    hidden = _logits(30, (B, 12, config.d_model), scale=1.0)  # stands in for model(tokens, return_hidden=True)
    embedding = _logits(31, (config.vocab_size, config.d_model), scale=1.0)
    teacher = sparse_from_logits(_logits(32, (B, 12, config.vocab_size)), 32, mode="sample", key=jax.random.key(5))
    targets = jax.random.randint(jax.random.key(33), (B, 12), 0, config.vocab_size)
    weights = jnp.ones((B, 12)).at[:, -1].set(0.0)
    options = dict(kind="fkl", alpha=0.5, temperature=2.0)

    @jax.jit
    def both(hidden, embedding):
        logits = head(hidden, embedding)
        expected, _ = distill_loss(logits, targets, weights, teacher, **options)
        got, _ = distill_loss_from_hidden(hidden, head, embedding, targets, weights, teacher, vocab_chunk=100,
                                          **options)
        return jnp.abs(logits).max(), expected, got

    largest, expected, got = both(hidden, embedding)
    assert float(largest) < 5.0  # the softcap is on
    _close(got, expected)


def test_losses_jit_with_static_options():
    student, teacher, targets, weights = _batch(15)
    sparse = sparse_from_logits(teacher, 8, mode="top")
    step = jax.jit(functools.partial(distill_loss, kind="jsd", alpha=0.1, temperature=2.0, beta=0.9))
    _close(step(student, targets, weights, sparse)[0],
           distill_loss(student, targets, weights, sparse, kind="jsd", alpha=0.1, temperature=2.0, beta=0.9)[0])


def test_bad_options_are_refused():
    student, teacher, targets, weights = _batch(16)
    with pytest.raises(ValueError, match="kind"):
        distill_loss(student, targets, weights, teacher, kind="kl")
    with pytest.raises(ValueError, match="needs a teacher"):
        distill_loss(student, targets, weights, kind="fkl")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            distill_loss(student, targets, weights, teacher, kind="jsd", beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, targets, weights, teacher, kind="fkl", temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(student, targets, weights, teacher, kind="fkl", alpha=1.5)
    with pytest.raises(ValueError, match="key"):
        sparse_from_logits(teacher, 4)
    with pytest.raises(ValueError, match="k must be"):
        sparse_from_logits(teacher, V + 1, mode="top")
    with pytest.raises(ValueError, match="SparseTeacher"):
        distill_loss_from_hidden(student, _softcap_head(None), jnp.ones((V, V)), targets, weights, teacher,
                                 kind="fkl")
