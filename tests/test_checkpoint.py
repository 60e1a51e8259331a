"""Model directories: exact round trip, strict loading, atomic writes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from nano.checkpoint import flat_params, load_model_dir, model_from_flat, save_model, save_model_dir
from nano.config import TINY
from nano.errors import NanoError


def test_round_trip_is_exact(tiny_model, tiny_model_dir):
    loaded, tokenizer = load_model_dir(tiny_model_dir)
    assert loaded.config == TINY
    saved, restored = flat_params(tiny_model), flat_params(loaded)
    assert saved.keys() == restored.keys()
    assert all(np.array_equal(saved[k], restored[k]) for k in saved)
    tokens = jnp.array([[2, 40, 41, 42]])
    assert np.array_equal(tiny_model(tokens)[0], loaded(tokens)[0])
    assert tokenizer.vocab_size == TINY.vocab_size


def test_load_in_bfloat16_computes_in_bfloat16(tiny_model_dir):
    model, _ = load_model_dir(tiny_model_dir, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert model.layers[0].mlp.up.kernel[...].dtype == jnp.bfloat16  # cast once, at load
    assert model.embedder.encode(jnp.array([[1]]), model.dtype).dtype == jnp.bfloat16


def test_strict_loading(tiny_model):
    params = {k: np.asarray(v) for k, v in flat_params(tiny_model).items()}
    missing = dict(params)
    missing.pop("layers.0.attn.q_proj.kernel")
    with pytest.raises(NanoError, match="missing"):
        model_from_flat(TINY, missing)
    with pytest.raises(NanoError, match="unexpected"):
        model_from_flat(TINY, {**params, "layers.9.mlp.up.kernel": params["layers.0.mlp.up.kernel"]})
    with pytest.raises(NanoError, match="shape"):
        model_from_flat(TINY, {**params, "final_norm.scale": np.ones(3, np.float32)})


def test_existing_output_is_kept_unless_overwrite(tiny_model, tiny_tokenizer, tmp_path):
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    with pytest.raises(NanoError, match="already exists"):
        save_model(tiny_model, tiny_tokenizer, out)
    save_model(tiny_model, tiny_tokenizer, out, overwrite=True)
    assert load_model_dir(out)[0].config == TINY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_failed_write_leaves_nothing(tiny_model, tiny_tokenizer, tmp_path):
    params = {k: np.asarray(v) for k, v in flat_params(tiny_model).items()}
    params["final_norm.scale"] = np.ones(3, np.float32)  # fails the check, after the output name is chosen
    with pytest.raises(NanoError):
        save_model_dir(TINY, params, tiny_tokenizer, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_damaged_directories_are_refused(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(NanoError, match="not valid JSON"):
        load_model_dir(broken)
    (broken / "config.json").write_text(json.dumps({**TINY.to_dict(), "vocab_size": 1000}))
    with pytest.raises(NanoError, match="tokenizer has 512 pieces"):
        load_model_dir(broken)
    (broken / "config.json").write_text(TINY.to_json())
    shutil.rmtree(broken / "params")
    with pytest.raises(NanoError, match="no params"):
        load_model_dir(broken)
    with pytest.raises(NanoError, match="not a model directory"):
        load_model_dir(tmp_path)


def test_relative_paths_work(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """`make distill` passes relative run directories; Orbax itself accepts only absolute paths."""
    monkeypatch.chdir(tmp_path)
    save_model(tiny_model, tiny_tokenizer, "runs/model")
    loaded, _ = load_model_dir("runs/model")
    for name, value in flat_params(tiny_model).items():
        np.testing.assert_array_equal(np.asarray(flat_params(loaded)[name]), np.asarray(value))
