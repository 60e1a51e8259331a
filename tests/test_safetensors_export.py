"""`nano export-safetensors`: the reverse of the Hugging Face import, checked by round trips, against the
independent checkpoint of `tests/hf_tiny.py` (its names and conventions spelled out there), and in transformers
itself (the `hf` extra; that test skips without it).

Round trips: export then `nano.safetensors_import` gives the same parameters (norms travel as `w = scale - 1`,
exact for every scale >= 0.5, which all of these have) and logits within 1e-5 for the `tiny` preset, a model storing
every setting, a depth-pruned model (irregular `layer_types`), an all-global one and a trimmed vocabulary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import hf_tiny
import student_models as sm
from cli.main import cli
from nano.checkpoint import load_config, save_model_dir
from nano.config import GLOBAL, LOCAL, TINY
from nano.names import HF, to_ours, to_source
from nano.quant import quantize_params
from nano.quant_scheme import QuantScheme
from nano.safetensors_export import export_safetensors
from nano.safetensors_import import import_safetensors

INDEX = "model.safetensors.index.json"


def _round_trip(src: Path, tmp: Path, **kwargs) -> tuple[Path, Path]:
    out = export_safetensors(src, tmp / "hf", **kwargs)
    return out, import_safetensors(out, tmp / "back")


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def every_setting(tmp_path_factory, tiny_tokenizer):
    return sm.write_model(tmp_path_factory.mktemp("src") / "model", sm.EVERY_SETTING, tiny_tokenizer)


# --- Round trips ---------------------------------------------------------------------------------------------

def test_tiny_preset_round_trip(tiny_model_dir, tmp_path):
    out, back = _round_trip(tiny_model_dir, tmp_path)
    sm.assert_same_model(tiny_model_dir, back)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()


@pytest.mark.slow
def test_every_setting_round_trip(every_setting, tmp_path):
    _, back = _round_trip(every_setting, tmp_path)
    sm.assert_same_model(every_setting, back)
    src = load_config(every_setting)  # Hugging Face spells the query scale out (query_pre_attn_scalar)
    assert load_config(back) == dataclasses.replace(src, query_pre_attn_scalar=float(src.head_dim))


@pytest.mark.slow
def test_depth_pruned_layer_types(tiny_tokenizer, tmp_path):
    src = sm.write_model(tmp_path / "src", TINY, tiny_tokenizer, layers=[0, 1, 3])
    out, back = _round_trip(src, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert "sliding_window_pattern" not in config  # no period describes it
    assert load_config(back).layer_types == (LOCAL, GLOBAL, GLOBAL)
    sm.assert_same_model(src, back)


@pytest.mark.slow
def test_all_global_round_trip(tiny_tokenizer, tmp_path):
    src = sm.write_model(tmp_path / "src", dataclasses.replace(TINY, sliding_window=None), tiny_tokenizer)
    out, back = _round_trip(src, tmp_path)
    assert json.loads((out / "config.json").read_text())["layer_types"] == ["full_attention"] * 4
    sm.assert_same_model(src, back)


@pytest.mark.slow
def test_trimmed_vocabulary_round_trip(tiny_tokenizer, tmp_path):
    src = sm.write_model(tmp_path / "src", TINY, tiny_tokenizer, vocab=sm.trimmed_vocab_ids(tiny_tokenizer))
    out, back = _round_trip(src, tmp_path)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    sm.assert_same_model(src, back)


@pytest.mark.slow
def test_sharded_past_the_limit(every_setting, tmp_path):
    out, back = _round_trip(every_setting, tmp_path, shard_bytes=40_000)
    index = json.loads((out / INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = {}
    for file in files:
        shard = load_file(out / file)
        assert sum(v.nbytes for v in shard.values()) <= 40_000 or len(shard) == 1
        assert all(index["weight_map"][name] == file for name in shard)
        tensors.update(shard)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    sm.assert_same_model(every_setting, back)


def test_norm_convention_is_exact_from_one_half():
    """w = scale - 1 is a float32 exactly for scale >= 0.5, so 1 + w is the scale again; below, within 2**-25."""
    scales = np.concatenate([np.float32(0.5) + np.arange(200_000, dtype=np.float32) * np.float32(2**-20),
                             np.geomspace(0.5, 1e4, 100_000).astype(np.float32)])
    np.testing.assert_array_equal(to_ours(to_source(scales, "norm", HF), "norm", HF), scales)
    small = np.geomspace(1e-6, 0.5, 100_000).astype(np.float32)
    assert np.abs(to_ours(to_source(small, "norm", HF), "norm", HF) - small).max() <= 2.0**-25


# --- Against the independent checkpoint of tests/hf_tiny.py ---------------------------------------------------

def test_export_of_imported_checkpoint_is_the_checkpoint(tmp_path, tiny_tokenizer):
    """Import tests/hf_tiny.py's checkpoint, export it: the same tensors under the same names, and a config.json
    that says what its own does."""
    src = hf_tiny.write_tiny_hf_checkpoint(tmp_path / "hf", tokenizer=tiny_tokenizer.proto)
    out = export_safetensors(import_safetensors(src, tmp_path / "ours"), tmp_path / "again")
    original, again = hf_tiny.tiny_hf_tensors(), _tensors(out)
    assert again.keys() == original.keys()
    for name, value in original.items():
        if name.endswith("norm.weight"):  # w went through our float32 1 + w: within half an ulp of that sum
            assert np.all(np.abs(again[name] - value) <= np.spacing(np.float32(1) + np.abs(value)) / 2), name
        else:
            np.testing.assert_array_equal(again[name], value, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    for key, value in hf_tiny.CONFIG.items():
        if key not in ("torch_dtype", "attention_dropout"):
            assert config[key] == value, key
    assert config["rope_parameters"] == {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 2, "eos_token_id": [1],
                                                                         "pad_token_id": 0}


# --- In transformers -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is the `hf` extra, test-only: pip install -e '.[hf]'")
@pytest.mark.parametrize("case", ["tiny preset", "every setting", "depth-pruned"])
def test_transformers_computes_our_logits(case, tiny_model_dir, every_setting, tiny_tokenizer, tmp_path):
    """`Gemma3ForCausalLM.from_pretrained` loads every tensor from our files (none missing, none left over) and its
    logits are ours within 1e-4."""
    import torch
    from transformers import Gemma3ForCausalLM

    src = {"tiny preset": tiny_model_dir, "every setting": every_setting}.get(case) or sm.write_model(
        tmp_path / "src", sm.EVERY_SETTING, tiny_tokenizer, layers=[0, 1, 3])
    out = export_safetensors(src, tmp_path / "hf")
    model, info = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                    output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.layer_types == json.loads((out / "config.json").read_text())["layer_types"]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([sm.TOKENS])).logits[0].numpy()
    delta = np.abs(logits - sm.logits(src)).max()
    assert delta <= 1e-4, delta


# --- Bad input, through the command line ----------------------------------------------------------------------

def _refused(args: list, message: str) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_quantized_dir_needs_dequantize(tiny_tokenizer, tmp_path):
    params = sm.trained_like(TINY)
    specs = QuantScheme(4, 32).tensor_specs(["layers.0.mlp.up.kernel"], embeddings="float")
    src = save_model_dir(TINY, quantize_params(params, specs), tiny_tokenizer, tmp_path / "src",
                         quant_info={"method": "gptq", "scheme": "int4-b32"})
    out = tmp_path / "out" / "hf"
    _refused(["export-safetensors", src, "--out", out], "is a quantized model (gptq int4-b32)")
    assert not out.parent.exists()
    result = CliRunner().invoke(cli, ["export-safetensors", str(src), "--out", str(out), "--dequantize"])
    assert result.exit_code == 0, result.output
    assert set(_tensors(out)) == set(hf_tiny.tiny_hf_tensors())


def test_existing_out_needs_force(every_setting, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep").write_text("mine")
    _refused(["export-safetensors", every_setting, "--out", out], "already exists (pass --force")
    assert [p.name for p in out.iterdir()] == ["keep"] and [p.name for p in tmp_path.iterdir()] == ["hf"]
    result = CliRunner().invoke(cli, ["export-safetensors", str(every_setting), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
