"""The quantized weight format: rounding, scales, packing, and the one model code running quantized weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nano.checkpoint import flat_params, param_path
from nano.kv_cache import KVCache
from nano.model import count_params
from nano.quant_scheme import QuantScheme, QuantSpec
from nano.quant import fake_quantize, pack_int4, quantize_rtn, unpack_int4

SPECS = [QuantSpec(4, 32, 0), QuantSpec(4, 128, 0), QuantSpec(4, 0, 0), QuantSpec(8, 0, 1), QuantSpec(4, 32, 1)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_error_within_half_a_scale(spec):
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(256, 96)).astype(np.float32) * 0.05  # heavy tails: outliers set block maxima
    w[5, 7] = 0.0
    w[:32, 0] = 0.0  # an all-zero block
    q = quantize_rtn(jnp.asarray(w), spec)
    scales = np.asarray(q.scales, np.float32)
    per_element = np.repeat(scales, spec.block(w.shape), axis=spec.axis)
    error = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(error <= per_element / 2 * (1 + 1e-6))
    lo, hi = spec.code_range
    codes = np.asarray(q.codes)
    assert codes.min() >= lo and codes.max() <= hi
    assert codes.min() < lo + 2 and codes.max() > hi - 2  # the range is used, not wasted
    assert np.all(codes[:32, 0] == 0) if spec.axis == 0 and spec.blockwise else True


def test_blockwise_scales_are_bfloat16_numbers_stored_exactly_as_float16():
    w = np.random.default_rng(1).normal(size=(64, 40)).astype(np.float32)
    q = quantize_rtn(jnp.asarray(w), QuantSpec(4, 32, 0))
    scales = np.asarray(q.scales)
    assert scales.dtype == np.float16
    as_float = scales.astype(np.float32)
    assert np.array_equal(as_float.astype(ml_dtypes.bfloat16).astype(np.float32), as_float)
    absmax = np.abs(w.reshape(2, 32, 40)).max(axis=1)
    assert np.all(as_float >= absmax / 7.5)  # rounded up, never down
    assert np.all(as_float <= absmax / 7.5 * (1 + 2 ** -7))  # by at most one bfloat16 step


def test_int4_packing_is_exact_and_tflite_ordered():
    codes = np.array([[1, -2, -8, 7]], np.int8)
    packed = pack_int4(codes, axis=1)
    assert packed.dtype == np.uint8 and packed.tolist() == [[0xE1, 0x78]]  # even element in the low nibble
    rng = np.random.default_rng(2)
    for axis in (0, 1):
        codes = rng.integers(-8, 8, size=(64, 48)).astype(np.int8)
        packed = pack_int4(codes, axis)
        assert packed.shape == ((32, 48) if axis == 0 else (64, 24))
        assert np.array_equal(unpack_int4(packed, axis), codes)


def test_fake_quantize_rounds_forward_and_passes_gradients_straight_through():
    spec = QuantSpec(4, 32, 0)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(64, 8)), jnp.float32)
    np.testing.assert_array_equal(fake_quantize(w, spec), quantize_rtn(w, spec).dequantize())
    grad = jax.grad(lambda w: jnp.sum(fake_quantize(w, spec) * jnp.arange(8.0)))(w)
    np.testing.assert_array_equal(grad, jnp.broadcast_to(jnp.arange(8.0), w.shape))


def quantized(model, *, block_size=32, embeddings="int8"):
    q = nnx.clone(model)
    specs = QuantScheme(4, block_size).tensor_specs(flat_params(model), embeddings=embeddings)
    state = nnx.state(q, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if param_path(path) in specs:
            var.set_value(quantize_rtn(var.get_value(), specs[param_path(path)]))
    nnx.update(q, state)
    return q


def dequantized(model):
    """The same model with every quantized weight replaced by its float value."""
    f = nnx.clone(model)
    state = nnx.state(f, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        if hasattr(value, "dequantize"):
            var.set_value(value.dequantize())
    nnx.update(f, state)
    return f


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["int8", "int4", "float"])
def test_quantized_model_runs_through_the_one_model_code(tiny_model, embeddings):
    q = quantized(tiny_model, block_size=32, embeddings=embeddings)
    assert count_params(q) == count_params(tiny_model)
    tokens = jnp.asarray(np.random.default_rng(4).integers(4, 512, size=(2, 20)), jnp.int32)
    logits, _ = q(tokens)
    reference, _ = dequantized(q)(tokens)
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    float_logits, _ = tiny_model(tokens)
    assert 0 < float(jnp.max(jnp.abs(logits - float_logits)))  # it is quantized, and still close
    assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(float_logits, -1))) > 0.5

    # prefill + token-by-token decode with a cache equals the full pass, quantized too
    cache = KVCache.zeros(q.config, 2, 32)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    step_logits, cache = q(tokens[:, :12], pos[:, :12], cache=cache)
    outs = [step_logits]
    for t in range(12, 20):
        out, cache = q(tokens[:, t:t + 1], pos[:, t:t + 1], cache=cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), logits, atol=1e-4)


@pytest.mark.slow
def test_quantized_model_jits_and_fits_the_scheme(tiny_model):
    q = quantized(tiny_model)
    graphdef, state = nnx.split(q)
    run = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    tokens = jnp.ones((1, 8), jnp.int32)
    np.testing.assert_allclose(run(state, tokens), q(tokens)[0], atol=1e-5)
    params = flat_params(q)
    assert params["layers.0.attn.q_proj.kernel"].spec == QuantSpec(4, 32, 0)
    assert params["embedder.embedding"].spec == QuantSpec(8, 0, 1)
    assert params["final_norm.scale"].dtype == jnp.float32
