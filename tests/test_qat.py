"""Quantization-aware training: the step's forward pass runs on the int4 grid, gradients reach the float masters,
and `nano distill --qat` writes the deployable quantized student."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from distill.settings import qat_scheme
from distill.sharding import make_mesh
from distill.step import OptimConfig, fake_quantizer, init_state, make_optimizer, make_train_step
from hf_tiny import training_text
from nano.checkpoint import flat_params, load_model_dir, load_quant_info, param_shapes
from cli.main import cli
from nano.config import TINY
from nano.errors import NanoError
from nano.scoring import next_token_nll as token_nll
from nano.quant_scheme import QuantScheme, QuantSpec
from nano.quant import quantize_rtn

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them


def ce(model, batch, rng):
    nll = token_nll(model(batch["tokens"])[0], batch["tokens"])[:, :-1]
    return jnp.mean(nll), {"ce": jnp.mean(nll)}


@pytest.mark.parametrize("embeddings", ["int8", "int4"])
def test_qat_step_runs_the_forward_on_the_int4_grid(embeddings):
    mesh = make_mesh(None)
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=2))
    graphdef, state = init_state(TINY, optimizer, seed=0, mesh=mesh)
    specs = QuantScheme(4, 32).tensor_specs(param_shapes(TINY), embeddings=embeddings)
    step = make_train_step(graphdef, optimizer, ce, mesh, jax.tree.map(lambda x: x.sharding, state),
                           param_transform=fake_quantizer(specs))
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 4, 32)).astype(np.int32)

    # the loss the step reports is the loss of the RTN-quantized model
    float_loss = float(ce(nnx.merge(graphdef, state.params), {"tokens": tokens[0]}, None)[0])
    quantized = nnx.clone(nnx.merge(graphdef, state.params))  # merge shares the state's variables: copy first
    qstate = nnx.state(quantized, nnx.Param)
    for path, var in nnx.to_flat_state(qstate):
        name = ".".join(map(str, path))
        if name in specs:
            var.set_value(quantize_rtn(var.get_value(), specs[name]).dequantize())
    nnx.update(quantized, qstate)
    expected = float(ce(quantized, {"tokens": tokens[0]}, None)[0])
    before = jax.tree.map(lambda x: np.array(x, copy=True), state.params)  # the step donates its input buffers
    state, metrics = step(state, {"tokens": tokens})
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    state, _ = step(state, {"tokens": tokens})  # (the schedule's first learning rate is 0)
    assert abs(expected - float_loss) > 1e-4  # the grid really changes the loss
    # straight-through: every master weight moved, quantized or not
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
    assert min(jax.tree.leaves(moved)) > 0


def test_qat_scheme_names():
    assert qat_scheme("int4-b32").block_size == 32 and qat_scheme("int4-b128").block_size == 128
    assert qat_scheme("int4-channel").block_size == 0
    for bad in ("int8-b32", "int4-32", "int4-b", "int4-b33"):
        with pytest.raises(NanoError, match="--qat takes"):
            qat_scheme(bad)


@pytest.mark.parametrize("embeddings, embedding_spec", [("int8", QuantSpec(8, 0, 1)), ("int4", QuantSpec(4, 32, 1))])
def test_nano_distill_qat_writes_the_quantized_student(tmp_path, tiny_model_dir, embeddings, embedding_spec):
    text, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    lines = training_text(lines=700)
    text.write_text("\n".join(lines[:600]))
    heldout.write_text("\n".join(lines[600:]))
    run = tmp_path / "qat"
    result = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", tiny_model_dir, "--student", tiny_model_dir, "--data", text, "--eval-data", heldout, "--steps", 2,
        "--batch-size", 2, "--seq-len", 16, "--top-k", 8, "--eval-batches", 1, "--qat", "int4-b32",
        "--qat-embeddings", embeddings, "--sparse-target", "rest", "--lr", 1e-3, "--out", run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    final, _ = load_model_dir(run / "final")
    deployed, _ = load_model_dir(run / "final-int4-b32")
    assert load_quant_info(run / "final-int4-b32")["scheme"] == "int4-b32"
    for name, value in flat_params(deployed).items():
        if hasattr(value, "spec"):  # the codes are RTN of the trained masters, on the grid the run trained for
            expected = quantize_rtn(flat_params(final)[name], value.spec)
            np.testing.assert_array_equal(np.asarray(value.codes), np.asarray(expected.codes))
    assert flat_params(deployed)["layers.0.mlp.up.kernel"].spec == QuantSpec(4, 32, 0)
    assert flat_params(deployed)["embedder.embedding"].spec == embedding_spec  # the grid the run trained on
