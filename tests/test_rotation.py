"""The MLP's Hadamard rotation (nano.rotation): the same function, less int4 loss where inputs have outlier
channels, and every stage that reads a model (quantize, export, GGUF, prune) takes it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import student_models as sm
from nano.checkpoint import flat_params, load_config, model_from_flat, save_model_dir
from nano.config import TINY, ModelConfig
from nano.gguf_export import export_gguf
from nano.gguf_import import import_gguf
from nano.quant import dynamic_int8, quantize_rtn
from nano.quant_scheme import QuantSpec
from nano.rotation import hadamard, rotate_last, rotate_rows, rotated_params
from quantize.pipeline import quantize_model
from quantize.settings import QuantizeSettings


@pytest.mark.parametrize("n", [2, 16, 128])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard(n).astype(np.float64)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)
    assert np.all(np.abs(np.abs(h) - n ** -0.5) < 1e-7)  # every entry ±1/√n: each output mixes every input equally
    with pytest.raises(ValueError, match="power of two"):
        hadamard(n + 1 if n > 2 else 3)


def test_rotated_model_computes_the_same_logits(tiny_model):
    params = {k: np.asarray(v) for k, v in flat_params(tiny_model).items()}
    config, rotated = rotated_params(TINY, params, 64, 32)
    assert (config.ffn_rotation, config.input_rotation) == (64, 32) and config.hash != TINY.hash
    for kernel in ("mlp.down", "mlp.up", "mlp.gate", "attn.q_proj", "attn.k_proj", "attn.v_proj"):
        name = f"layers.0.{kernel}.kernel"
        assert not np.allclose(rotated[name], params[name]), name
    np.testing.assert_array_equal(rotated["layers.0.attn.o_proj.kernel"], params["layers.0.attn.o_proj.kernel"])
    tokens = jnp.asarray(np.arange(3, 40)[None])
    plain, _ = tiny_model(tokens)
    turned, _ = model_from_flat(config, rotated)(tokens)
    assert float(jnp.abs(turned - plain).max()) < 1e-5
    # Rotating to other blocks goes through the plain model; the rotations out give the original back.
    config32, rotated32 = rotated_params(config, rotated, 32, 16)
    turned, _ = model_from_flat(config32, rotated32)(tokens)
    assert float(jnp.abs(turned - plain).max()) < 1e-5
    back_config, back = rotated_params(config32, rotated32, None, None)
    assert (config32.ffn_rotation, config32.input_rotation) == (32, 16)
    assert back_config == TINY and back_config.hash == TINY.hash
    for name, value in params.items():
        np.testing.assert_allclose(back[name], value, atol=1e-6, err_msg=name)


def test_rotate_last_is_the_kernel_rotation_seen_from_the_input():
    x = np.random.default_rng(0).normal(size=(3, 5, 64)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(64, 7)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rotate_last(jnp.asarray(x), 16)) @ rotate_rows(w, 16), x @ w,
                               rtol=1e-4, atol=1e-4)


def test_rotation_spreads_outliers_that_int4_blocks_and_int8_rows_round_around():
    """The premise. A kernel row far larger than the rest sets its block's int4 step for all 32 weights; an input
    channel far larger than the rest sets its row's int8 step (the device's dynamic quantization) for every
    channel. Rotated, each carries 1/√n of the outlier and both round finely."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2048, 256))
    w = rng.normal(size=(256, 64)) * 0.05
    w[[3, 77, 140]] *= 20.0
    spec = QuantSpec(4, 32, 0)

    def weight_error(x, w):
        q = np.asarray(quantize_rtn(jnp.asarray(w, jnp.float32), spec).dequantize(), np.float64)
        return float(np.mean((x @ w - x @ q) ** 2))

    rotate = lambda x: np.asarray(rotate_last(jnp.asarray(x, jnp.float32), 128), np.float64)
    assert weight_error(rotate(x), rotate_rows(w, 128)) < 0.5 * weight_error(x, w)

    x[:, [5, 200]] *= 50.0
    def input_error(x):
        return float(np.mean((x - np.asarray(dynamic_int8(jnp.asarray(x, jnp.float32)), np.float64)) ** 2))

    assert input_error(rotate(x)) < 0.5 * input_error(x)


def test_config_checks_the_block():
    with pytest.raises(ValueError, match="ffn_rotation must be a power of two dividing ffn_dim"):
        dataclasses.replace(TINY, ffn_rotation=48)
    with pytest.raises(ValueError, match="ffn_rotation"):
        dataclasses.replace(TINY, ffn_rotation=256)  # tiny's ffn_dim is 128
    with pytest.raises(ValueError, match="input_rotation must be a power of two dividing d_model"):
        dataclasses.replace(TINY, input_rotation=128)  # tiny's d_model is 64
    config = dataclasses.replace(TINY, ffn_rotation=64, input_rotation=64)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert not {"ffn_rotation", "input_rotation"} & set(TINY.to_dict())  # configs without them keep their hash


@pytest.mark.parametrize(("rotate", "expected"), [(128, 128), (256, 128), (64, 64), (0, None)])
def test_quantize_rotates_by_the_largest_block_that_divides(rotate, expected, tiny_model, tiny_tokenizer):
    settings = QuantizeSettings(rotate=rotate)
    assert settings.rotation(TINY.ffn_dim) == expected
    inputs = expected and min(expected, TINY.d_model)
    qmodel, info = quantize_model(tiny_model, tiny_tokenizer, settings)
    assert (qmodel.config.ffn_rotation, qmodel.config.input_rotation) == (expected, inputs)
    assert info["rotation"] == {"ffn": expected, "inputs": inputs}
    assert tiny_model.config.ffn_rotation is None and tiny_model.config.input_rotation is None  # left as it was
    assert settings.rotation(576) == (min(rotate, 64) or None)  # 576 = 2^6 · 9


def test_rotate_is_checked():
    from nano.errors import NanoError

    with pytest.raises(NanoError, match="--rotate takes a power of two"):
        QuantizeSettings(rotate=96).check()


@pytest.fixture(scope="module")
def rotated_dir(tiny_tokenizer, tmp_path_factory):
    config, params = rotated_params(TINY, sm.trained_like(TINY), 32, 16)
    return save_model_dir(config, params, tiny_tokenizer, tmp_path_factory.mktemp("rotated") / "model")


@pytest.mark.slow
def test_gguf_export_takes_the_rotation_out(rotated_dir, tiny_tokenizer, tmp_path):
    """llama.cpp knows no rotation: the GGUF holds the plain Gemma 3 weights, which compute the same logits."""
    back = import_gguf(export_gguf(rotated_dir, tmp_path / "m.gguf"), tmp_path / "back")
    assert (load_config(back).ffn_rotation, load_config(back).input_rotation) == (None, None)
    plain = save_model_dir(TINY, sm.trained_like(TINY), tiny_tokenizer, tmp_path / "plain")
    for name, value in sm.params(plain).items():
        np.testing.assert_allclose(sm.params(back)[name], value, atol=1e-6, err_msg=name)
    reference = sm.logits(rotated_dir)  # logits of ~100 here: float32 rounding of the two orders of summation
    assert float(np.abs(sm.logits(back) - reference).max()) < 1e-6 * float(np.abs(reference).max())


@pytest.mark.slow
def test_rotated_model_exports_and_verifies(rotated_dir, tmp_path):
    """The rotation is one float FULLY_CONNECTED per MLP in the artifact, which runs what JAX computes."""
    out = tmp_path / "rotated.litertlm"
    nano_export = Path(sys.executable).parent / "nano-export"
    result = subprocess.run([str(nano_export), str(rotated_dir), "--out", str(out), "--prefill-lengths", "8",
                             "--max-tokens", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "|Δlogit|" in result.stdout and out.exists()


@pytest.mark.slow
def test_prune_cuts_a_rotated_model_as_its_plain_one(rotated_dir, tiny_tokenizer, tmp_path, corpus):
    from prune.run import prune
    from prune.settings import PruneSettings

    plain = save_model_dir(TINY, sm.trained_like(TINY), tiny_tokenizer, tmp_path / "plain")
    settings = PruneSettings(ffn_dim=64, calibration=(str(corpus / "train.txt"),), samples=4, seq_len=32)
    prune(str(rotated_dir), tmp_path / "a", settings)
    prune(str(plain), tmp_path / "b", settings)
    assert load_config(tmp_path / "a").ffn_rotation is None and load_config(tmp_path / "a").input_rotation is None
    np.testing.assert_allclose(sm.logits(tmp_path / "a"), sm.logits(tmp_path / "b"), atol=1e-4)
