"""The quantization methods (GPTQ, AWQ), quantized model directories, and `nano quantize`."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from checks import assert_refused_cleanly
from nano.checkpoint import flat_params, load_model_dir, load_quant_info, save_model
from cli.main import cli
from nano.errors import NanoError
from nano.quant_scheme import QuantSpec
from nano.quant import quantize_rtn
from quantize import awq
from quantize.calibrate import walk_blocks
from quantize.gptq import gptq
from quantize.pipeline import awq_scale_and_fold, quantize_model
from quantize.settings import QuantizeSettings

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

SPEC = QuantSpec(4, 32, 0)


def correlated_inputs(n=2048, dim=128, seed=0):
    """Inputs with correlated channels and a few loud ones, as a transformer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
    x = rng.normal(size=(n, dim)) @ mix
    x[:, :4] *= 8.0
    return x


def output_error(x, w, q):
    return float(np.mean((x @ w - x @ np.asarray(q.dequantize(), np.float64)) ** 2))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_a_random_layer(act_order):
    x = correlated_inputs()
    w = np.random.default_rng(1).normal(size=(128, 64)) * 0.05
    h = x.T @ x / len(x)
    rtn, gq = quantize_rtn(jnp.asarray(w, jnp.float32), SPEC), gptq(w, h, SPEC, act_order=act_order)
    assert output_error(x, w, gq) < 0.75 * output_error(x, w, rtn)
    lo, hi = SPEC.code_range
    assert np.asarray(gq.codes).min() >= lo and np.asarray(gq.codes).max() <= hi
    assert gq.scales.dtype == np.float16 and gq.scales.shape == (4, 64)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """With H = I no error can be compensated: GPTQ must round exactly as RTN does."""
    w = np.random.default_rng(2).normal(size=(64, 16))
    g = gptq(w, np.eye(64), SPEC, act_order=False, damp=1e-6)
    r = quantize_rtn(jnp.asarray(w, jnp.float32), SPEC)
    np.testing.assert_array_equal(np.asarray(g.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(g.scales), np.asarray(r.scales))


def test_awq_search_and_clip_lower_the_output_error():
    x = correlated_inputs(seed=3)
    w = np.random.default_rng(4).normal(size=(128, 64)) * 0.05
    h = x.T @ x / len(x)
    s = awq.search_scale([w], h, np.abs(x).mean(0), [SPEC])
    scaled = awq.clip_and_quantize(w * s[:, None], h / np.outer(s, s), SPEC)
    restored = np.asarray(scaled.dequantize(), np.float64) / s[:, None]
    awq_error = float(np.mean((x @ w - x @ restored) ** 2))
    assert awq_error < 0.9 * output_error(x, w, quantize_rtn(jnp.asarray(w, jnp.float32), SPEC))


def test_awq_folding_keeps_each_block_s_float_function(tiny_model, tiny_tokenizer):
    """Scales folded into norms and v / up projections leave every block computing what it did."""
    model = nnx.clone(tiny_model)
    tokens = np.random.default_rng(5).integers(4, 512, size=(4, 24)).astype(np.int32)
    reference, _ = tiny_model(jnp.asarray(tokens))
    seen = []

    def fold(index, block, stats):
        x = jnp.asarray(np.random.default_rng(index).normal(size=(2, 24, 64)), jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
        before, _ = block(x, pos)
        awq_scale_and_fold(block, stats, dict.fromkeys(stats, SPEC), model.config)
        after, _ = block(x, pos)
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
        seen.append(sorted(stats))

    walk_blocks(model, tokens, fold, batch_size=2)
    assert len(seen) == model.config.num_layers
    assert seen[0] == ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down", "mlp.gate", "mlp.up"]
    np.testing.assert_allclose(model(jnp.asarray(tokens))[0], reference, rtol=1e-3, atol=1e-3)


def test_calibration_hessian_is_the_input_second_moment(tiny_model):
    tokens = np.random.default_rng(6).integers(4, 512, size=(4, 16)).astype(np.int32)
    got = {}
    head = walk_blocks(tiny_model, tokens, lambda i, block, stats: got.setdefault(i, stats), batch_size=3)
    hidden = np.asarray(tiny_model(jnp.asarray(tokens), return_hidden=True)[0], np.float64).reshape(-1, 64)
    np.testing.assert_allclose(head.hessian, hidden.T @ hidden / len(hidden), rtol=1e-4, atol=1e-6)
    assert head.tokens == 64  # the head's input: the blocks' output, final-normed
    x = tiny_model.embedder.encode(jnp.asarray(tokens), jnp.float32)
    normed = np.asarray(tiny_model.layers[0].attn_norm(x), np.float64).reshape(-1, 64)
    stats = got[0]["attn.q_proj"]
    np.testing.assert_allclose(stats.hessian, normed.T @ normed / len(normed), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.mean_abs, np.abs(normed).mean(0), rtol=1e-5)
    assert got[0]["attn.k_proj"] is not None and stats.tokens == 64


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((Path(__file__).parents[1] / "nano" / "model.py").read_text())
    return path


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_model_methods(tiny_model, tiny_tokenizer, calibration_file, method):
    settings = QuantizeSettings(method=method, calibration=str(calibration_file), samples=8, seq_len=32)
    q, info = quantize_model(tiny_model, tiny_tokenizer, settings)
    params = flat_params(q)
    assert params["layers.0.mlp.down.kernel"].spec == SPEC
    assert params["embedder.embedding"].spec == QuantSpec(8, 0, 1)
    assert not hasattr(flat_params(tiny_model)["layers.0.mlp.down.kernel"], "spec")  # the input model untouched
    assert info["method"] == method and ("calibration" in info) == (method != "rtn")
    tokens = jnp.asarray(tiny_tokenizer.encode("def f(x):\n    return x + 1\n")[:16])[None]
    assert np.all(np.isfinite(np.asarray(q(tokens)[0])))
    with pytest.raises(NanoError, match="already quantized"):
        quantize_model(q, tiny_tokenizer, settings)


def test_gptq_calibrates_an_int4_head_better_than_rtn(tiny_model, tiny_tokenizer, calibration_file):
    """With --embeddings int4, GPTQ quantizes the tied table as the output head, on the final hidden states the
    quantized blocks make: the logits' error over those states is below round-to-nearest's codes (same scales)."""
    from nano.perplexity import calibration_windows

    settings = QuantizeSettings(method="gptq", embeddings="int4", calibration=str(calibration_file), samples=8,
                                seq_len=32)
    q, info = quantize_model(tiny_model, tiny_tokenizer, settings)
    table = flat_params(q)["embedder.embedding"]
    assert info["head"] == "gptq" and table.spec == QuantSpec(4, 32, 1) and table.codes.shape == (512, 64)
    tokens = calibration_windows(tiny_tokenizer, calibration_file.read_text(), samples=8, seq_len=32)
    hidden = np.asarray(q(jnp.asarray(tokens), return_hidden=True)[0], np.float64).reshape(-1, 64)
    float_table = np.asarray(flat_params(tiny_model)["embedder.embedding"], np.float64)
    rtn = quantize_rtn(jnp.asarray(float_table, jnp.float32), table.spec)

    def logit_error(quantized) -> float:
        return float(np.sum((hidden @ (float_table - np.asarray(quantized.dequantize(), np.float64)).T) ** 2))

    assert logit_error(table) < 0.8 * logit_error(rtn)
    _, plain = quantize_model(tiny_model, tiny_tokenizer, QuantizeSettings(method="rtn", embeddings="int4"))
    assert "head" not in plain  # RTN rounds the table as it does everything


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int8_projections_beside_int4(tiny_model, tiny_tokenizer, calibration_file, method):
    """--int8 mlp.down,attn.v_proj: those kernels int8 per channel in every block (calibrated by the same method),
    the rest int4; the model's logits come closer to the float model's than all-int4's."""
    common = dict(method=method, calibration=str(calibration_file), samples=8, seq_len=32)
    mixed, info = quantize_model(tiny_model, tiny_tokenizer, QuantizeSettings(**common, int8=("mlp.down",
                                                                                             "attn.v_proj")))
    plain, _ = quantize_model(tiny_model, tiny_tokenizer, QuantizeSettings(**common))
    params = flat_params(mixed)
    for i in range(tiny_model.config.num_layers):
        assert params[f"layers.{i}.mlp.down.kernel"].spec == QuantSpec(8, 0, 0)
        assert params[f"layers.{i}.attn.v_proj.kernel"].spec == QuantSpec(8, 0, 0)
        assert params[f"layers.{i}.mlp.up.kernel"].spec == SPEC
    assert info["settings"]["int8"] == ("mlp.down", "attn.v_proj")
    tokens = jnp.asarray(tiny_tokenizer.encode(calibration_file.read_text()[:2000])[:96])[None]
    reference = np.asarray(tiny_model(tokens)[0])

    def error(model) -> float:
        return float(np.mean((np.asarray(model(tokens)[0]) - reference) ** 2))

    assert error(mixed) < 0.9 * error(plain)


def test_quantize_refuses_unknown_int8_projections(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_model_dir), "--out", str(out), "--int8", "mlp.down,ffn"])
    assert result.exit_code == 1 and "--int8 takes projection names" in result.output and "ffn" in result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_quantize_refuses_a_block_size_that_does_not_divide(tiny_model, tiny_tokenizer):
    with pytest.raises(NanoError, match="block-size 48"):
        quantize_model(tiny_model, tiny_tokenizer, QuantizeSettings(block_size=48))


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory, tiny_model_dir, calibration_file):
    out = tmp_path_factory.mktemp("q") / "gptq"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_model_dir), "--out", str(out), "--method", "gptq",
                                      "--calibration", str(calibration_file), "--samples", "8", "--seq-len", "32",
                                      "--eval-text", str(calibration_file), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output[result.output.index("{"):])


def test_nano_quantize_writes_a_model_directory_every_command_takes(quant_dir, tiny_model_dir, calibration_file):
    out, result = quant_dir
    assert result["bits_per_linear_weight"] == pytest.approx(4.5)  # 4 bits + a 16-bit scale per 32
    assert 4.5 < result["bits_per_weight"] < 8.2
    assert result["bytes_on_disk"] < result["source_bytes_on_disk"] / 2  # the tokenizer weighs a lot here
    report = result["report"]
    assert report["kl"] > 0 and 0 < report["top1_agreement"] <= 1 and report["tokens"] > 100
    assert report["quant_ppl"] == pytest.approx(report["float_ppl"] + report["ppl_increase"])

    model, _ = load_model_dir(out)
    assert flat_params(model)["layers.1.attn.o_proj.kernel"].spec == SPEC
    assert load_quant_info(out)["method"] == "gptq"
    # `nano perplexity` on the quantized directory gives the report's figure (same protocol)
    ppl = CliRunner().invoke(cli, ["perplexity", str(out), "--text", str(calibration_file), "--json"])
    assert ppl.exit_code == 0, ppl.output
    assert json.loads(ppl.output[ppl.output.index("{"):])["ppl"] == pytest.approx(report["quant_ppl"], rel=1e-4)
    info = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert json.loads(info.output)["bits_per_weight"] == pytest.approx(result["bits_per_weight"])
    float_info = CliRunner().invoke(cli, ["info", str(tiny_model_dir), "--json"])
    assert json.loads(float_info.output)["bits_per_weight"] == 32.0


def test_saved_codes_and_scales_round_trip_exactly(quant_dir, tmp_path, tiny_tokenizer):
    out, _ = quant_dir
    model, _ = load_model_dir(out)
    again = save_model(model, tiny_tokenizer, tmp_path / "again")
    reloaded, _ = load_model_dir(again)
    for name, value in flat_params(model).items():
        other = flat_params(reloaded)[name]
        if hasattr(value, "codes"):
            np.testing.assert_array_equal(np.asarray(value.codes), np.asarray(other.codes))
            np.testing.assert_array_equal(np.asarray(value.scales), np.asarray(other.scales))
            assert value.spec == other.spec
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(other))


def _broken(quant_dir, tmp_path, edit):
    out, _ = quant_dir
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    meta = json.loads((broken / "quant.json").read_text())
    if isinstance(edit, str):  # raw text instead of JSON
        (broken / "quant.json").write_text(edit)
    else:
        edit(meta)
        (broken / "quant.json").write_text(json.dumps(meta))
    return broken


def _set(meta, path, value):
    meta["tensors"]["layers.0.attn.q_proj.kernel"][path] = value


@pytest.mark.parametrize("edit, message", [
    ("{not json", "not valid JSON"),
    (lambda m: m.pop("format"), "not a nano quantization file"),
    (lambda m: m.update(version=99), "version 99"),
    (lambda m: m.update(config_hash="0" * 16), "written for another model"),
    (lambda m: _set(m, "block_size", 16), r"q_proj.kernel.codes|q_proj.kernel.scales"),
    (lambda m: _set(m, "bits", 8), r"q_proj.kernel.codes is uint8"),
    (lambda m: _set(m, "bits", 3), "entry for layers.0.attn.q_proj.kernel is invalid"),
    (lambda m: m["tensors"].pop("layers.0.mlp.up.kernel"), "does not list"),
])
def test_corrupt_or_mismatched_quant_json_is_refused(quant_dir, tmp_path, edit, message):
    broken = _broken(quant_dir, tmp_path, edit)
    with pytest.raises(NanoError, match=message) as e:
        load_model_dir(broken)
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(cli, ["perplexity", str(broken), "--text", str(broken / "quant.json")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_quantized_parameters_without_quant_json_are_refused(quant_dir, tmp_path):
    broken = _broken(quant_dir, tmp_path, lambda m: None)
    (broken / "quant.json").unlink()
    with pytest.raises(NanoError, match="no quant.json"):
        load_model_dir(broken)


def test_nano_quantize_bad_input_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "q" / "model"
    assert_refused_cleanly(lambda: quantize_model_cli(tiny_model_dir, out, "--block-size", "48"), out, "block-size")
    assert_refused_cleanly(lambda: quantize_model_cli(tiny_model_dir, out, "--method", "gptq", "--calibration",
                                                      str(tmp_path / "missing.txt")), out, "missing.txt")
    assert_refused_cleanly(lambda: quantize_model_cli(tmp_path / "nothing", out), out, "nothing")
    result = CliRunner().invoke(cli, ["quantize", str(tiny_model_dir), "--out", str(out), "--block-size", "big"])
    assert result.exit_code == 1 and "Error: --block-size" in result.output


def quantize_model_cli(model, out, *args):
    from quantize.run import quantize
    from quantize.settings import parse_block_size

    options = dict(zip(args[::2], args[1::2]))
    settings = QuantizeSettings(method=options.get("--method", "rtn"),
                                block_size=parse_block_size(options.get("--block-size", "32")),
                                calibration=options.get("--calibration"), samples=4, seq_len=32)
    return quantize(str(model), out, settings, evaluate=False)


def test_compare_tabulates_and_plots_quantized_directories(quant_dir, tmp_path):
    from quantize.report import compare_directories as compare

    out, result = quant_dir
    rows = compare([out], tmp_path / "cmp")
    assert rows[0]["method"] == "gptq" and rows[0]["quant_ppl"] == pytest.approx(result["report"]["quant_ppl"])
    assert "| gptq | gptq | int4-b32 | " in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(NanoError, match="not a quantized model directory"):
        compare([tmp_path / "cmp"], tmp_path / "cmp2")


def test_distill_takes_a_quantized_directory_as_teacher_and_as_student(quant_dir, tmp_path, calibration_file):
    out, _ = quant_dir
    text = calibration_file.read_text()
    (tmp_path / "train.txt").write_text(text[: len(text) * 3 // 4])
    (tmp_path / "heldout.txt").write_text(text[len(text) * 3 // 4:])
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", out, "--student", out, "--data", tmp_path / "train.txt", "--eval-data",
        tmp_path / "heldout.txt", "--steps", 1, "--batch-size", 2, "--seq-len", 16, "--top-k", 8,
        "--eval-batches", 1, "--json", "--out", run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.output[result.output.index("{\n"):])
    # the student starts as the teacher's dequantized weights: they agree before any training step moves them
    assert report["final_eval"]["teacher_student_top1"] > 0.9
    student, _ = load_model_dir(run / "final")
    assert not any(hasattr(v, "spec") for v in flat_params(student).values())  # trained in float
