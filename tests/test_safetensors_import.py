"""Importing Hugging Face Gemma 3 checkpoints: logits against transformers, the config mapping, bad input.

The checkpoint is written by `tests/hf_tiny.py` (seeded numpy, Hugging Face names and conventions); the golden
logits in `tests/golden/hf_tiny_logits.npz` are transformers' `Gemma3ForCausalLM` on that same checkpoint, made
by `tests/golden/make_hf_golden.py` (which needs torch and transformers; the test does not).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checks import assert_refused_cleanly
from nano.checkpoint import flat_params, load_model_dir
from nano.config import GLOBAL, LOCAL
from nano.errors import NanoError
from nano.safetensors_import import config_from_hf, hf_text_config, import_safetensors

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "hf_tiny_logits.npz"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _load_hf_tiny():
    spec = importlib.util.spec_from_file_location("hf_tiny", TESTS / "hf_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hf_tiny = _load_hf_tiny()


@pytest.fixture(scope="module")
def tokenizer_proto():
    return hf_tiny.train_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_proto):
    return hf_tiny.write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", tokenizer=tokenizer_proto)


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    out = import_safetensors(hf_dir, tmp_path_factory.mktemp("imported") / "model")
    return out, *load_model_dir(out)


@pytest.fixture
def src(hf_dir, tmp_path):
    """A private copy of the checkpoint for a test to damage."""
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


# --- Against transformers -------------------------------------------------------------------------------------

def test_logits_match_transformers(imported):
    golden = np.load(GOLDEN)
    assert golden["tokens"].tolist() == [hf_tiny.TOKENS], "golden tokens differ from tests/hf_tiny.py: regenerate"
    _, model, _ = imported
    logits, _ = model(jnp.asarray(golden["tokens"]))
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == golden["logits"].shape == (1, 24, 512)
    delta = np.abs(logits - golden["logits"]).max()
    assert delta <= 1e-4, (f"max |logit - transformers {golden['transformers']}| = {delta:.3g} (if tests/hf_tiny.py "
                           f"changed, rerun tests/golden/make_hf_golden.py)")


def test_model_dir_contents(imported, tokenizer_proto):
    out, model, tokenizer = imported
    assert json.loads((out / "source.json").read_text()) == {"source": "tiny", "format": "safetensors",
                                                             "model_type": "gemma3_text"}
    assert tokenizer.proto == tokenizer_proto and tokenizer.vocab_size == model.config.vocab_size == 512


def test_weight_conventions(imported):
    """Kernels transposed to [in, out], norms 1 + w, embedding as is."""
    _, model, _ = imported
    ours, hf = _params(model), hf_tiny.tiny_hf_tensors()
    np.testing.assert_array_equal(ours["embedder.embedding"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ours["layers.2.attn.k_proj.kernel"], hf["model.layers.2.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(ours["layers.1.mlp.down.kernel"], hf["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(ours["layers.3.attn.q_norm.scale"], 1 + hf["model.layers.3.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(ours["final_norm.scale"], 1 + hf["model.norm.weight"])


# --- The config mapping --------------------------------------------------------------------------------------

def test_config_mapping(imported):
    _, model, _ = imported
    c = model.config
    # HF: layers 1 and 3 are "full_attention", 0 and 2 "sliding_attention".
    assert c.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL) and c.global_every == 2
    assert (c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim) == (
        512, 64, 4, 4, 2, 16, 128)
    assert (c.sliding_window, c.rope_base_global, c.rope_base_local, c.rope_scale_global) == (8, 1e6, 1e4, 8.0)
    assert (c.norm_eps, c.query_pre_attn_scalar, c.final_logit_softcap, c.max_seq_len) == (1e-6, 24.0, 30.0, 256)


_DROP = object()  # a field config.json leaves out


def _config(**changes):
    cfg = {k: v for k, v in {**hf_tiny.CONFIG, **changes}.items() if v is not _DROP}
    return config_from_hf(hf_text_config(cfg)[0])


@pytest.mark.parametrize("layer_types, every", [
    (["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"], 6),
    (["full_attention"] * 12, 1),
    (["sliding_attention"] * 12, 13),
])
def test_layer_types_to_global_every(layer_types, every):
    c = _config(num_hidden_layers=12, layer_types=layer_types)
    assert c.global_every == every
    assert c.layer_types == tuple(GLOBAL if t == "full_attention" else LOCAL for t in layer_types)


def test_irregular_layer_types_become_layer_kinds():
    """A depth-pruned student keeps each kept layer's kind: a list no period describes is kept layer by layer."""
    c = _config(layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"])
    assert c.layer_types == (LOCAL, GLOBAL, GLOBAL, LOCAL) and c.layer_kinds == c.layer_types


def test_sliding_window_pattern_without_layer_types():
    c = _config(num_hidden_layers=12, layer_types=_DROP, sliding_window_pattern=3)
    assert c.global_every == 3 and c.layer_types.count(GLOBAL) == 4
    assert _config(num_hidden_layers=12, layer_types=_DROP).global_every == 6  # transformers' default


def test_transformers5_rope_parameters():
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}
    c = _config(rope_parameters=rope, rope_theta=_DROP, rope_local_base_freq=_DROP, rope_scaling=_DROP)
    assert (c.rope_base_global, c.rope_base_local, c.rope_scale_global) == (5e5, 2e4, 8.0)
    c = _config(rope_scaling=None, final_logit_softcapping=None)
    assert (c.rope_scale_global, c.final_logit_softcap) == (1.0, None)


def test_defaults_fill_missing_fields():
    c = _config(query_pre_attn_scalar=_DROP, rms_norm_eps=_DROP, rope_theta=_DROP, rope_local_base_freq=_DROP,
                final_logit_softcapping=_DROP)
    assert (c.query_pre_attn_scalar, c.norm_eps, c.rope_base_global, c.rope_base_local, c.final_logit_softcap) == (
        256.0, 1e-6, 1e6, 1e4, None)


# --- Other layouts of the same checkpoint ---------------------------------------------------------------------

def _merge_shards(src: Path, rename=lambda k: k) -> dict[str, np.ndarray]:
    tensors = {**load_file(src / SHARD1), **load_file(src / SHARD2)}
    for f in (SHARD1, SHARD2, INDEX):
        (src / f).unlink()
    return {rename(k): v for k, v in tensors.items()}


def test_single_file_without_index(src, tmp_path, imported):
    save_file(_merge_shards(src), str(src / "model.safetensors"))
    model, _ = load_model_dir(import_safetensors(src, tmp_path / "out"))
    ours, ref = _params(model), _params(imported[1])
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_bfloat16_weights(tmp_path, tokenizer_proto):
    src = hf_tiny.write_tiny_hf_checkpoint(tmp_path / "bf16", dtype="bfloat16", tokenizer=tokenizer_proto)
    params = _params(load_model_dir(import_safetensors(src, tmp_path / "out"))[0])
    hf = hf_tiny.tiny_hf_tensors()
    bf16 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in hf.items()}
    np.testing.assert_array_equal(params["embedder.embedding"], bf16["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["layers.0.attn.v_proj.kernel"],
                                  bf16["model.layers.0.self_attn.v_proj.weight"].T)
    np.testing.assert_array_equal(params["layers.0.attn_norm.scale"], 1 + bf16["model.layers.0.input_layernorm.weight"])
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_checkpoint(src, tmp_path, imported, prefix):
    """Gemma3ForConditionalGeneration: nested text_config, prefixed names, a vision tower to skip, and image-token
    embedding rows past the SentencePiece vocabulary to drop."""
    tensors = _merge_shards(src, lambda k: prefix + k.removeprefix("model."))
    extra_rows = np.ones((8, hf_tiny.HIDDEN), np.float32)
    tensors[prefix + "embed_tokens.weight"] = np.concatenate([tensors[prefix + "embed_tokens.weight"], extra_rows])
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = np.zeros(4, np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    text = {k: v for k, v in hf_tiny.CONFIG.items() if k not in ("architectures", "torch_dtype")}
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {**text, "vocab_size": 520}, "vision_config": {"model_type": "siglip_vision_model"}}))
    out = import_safetensors(src, tmp_path / "out")
    model, _ = load_model_dir(out)
    assert json.loads((out / "source.json").read_text())["vocab_rows_dropped"] == 8
    ours, ref = _params(model), _params(imported[1])
    assert model.config == imported[1].config
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_overwrite(imported, hf_dir):
    out = imported[0]
    with pytest.raises(NanoError, match="already exists"):
        import_safetensors(hf_dir, out)
    assert import_safetensors(hf_dir, out, overwrite=True) == out


# --- Bad input ------------------------------------------------------------------------------------------------

def _edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(src: Path, name: str, value=None):
    """Replace (or with value None drop) one tensor of the sharded checkpoint, index included."""
    index = json.loads((src / INDEX).read_text())
    file = index["weight_map"][name]
    tensors = load_file(src / file)
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
    save_file(tensors, str(src / file))
    (src / INDEX).write_text(json.dumps(index))


def _no_safetensors(src: Path):
    for f in (SHARD1, SHARD2, INDEX):
        (src / f).unlink()


def _drop_from_file_only(src: Path):
    """The index still lists the tensor; its shard no longer has it."""
    tensors = load_file(src / SHARD1)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, str(src / SHARD1))


def _add_head(src: Path, head: np.ndarray):
    index = json.loads((src / INDEX).read_text())
    save_file({"lm_head.weight": head}, str(src / "head.safetensors"))
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (src / INDEX).write_text(json.dumps(index))


def _bigger_vocab(src: Path):
    _edit_config(src, vocab_size=520)
    _edit_tensor(src, "model.embed_tokens.weight", np.zeros((520, hf_tiny.HIDDEN), np.float32))


ALTERNATING = ["sliding_attention", "full_attention"]
BAD = {  # case: (damage done to a copy of the checkpoint, what the message says)
    "missing dir": (shutil.rmtree, "does not exist"),
    "missing config.json": (lambda src: (src / "config.json").unlink(), "no config.json"),
    "config not JSON": (lambda src: (src / "config.json").write_text("{model_type: gemma3"), "not valid JSON"),
    "unknown model_type": (lambda src: _edit_config(src, model_type="llama"), "unknown architecture 'llama'"),
    "gemma3 without text_config": (lambda src: _edit_config(src, model_type="gemma3"), "without a text_config"),
    "layer_types wrong length": (lambda src: _edit_config(src, layer_types=ALTERNATING), "must list 4"),
    "rope type": (lambda src: _edit_config(src, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    "attention softcap": (lambda src: _edit_config(src, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    "activation": (lambda src: _edit_config(src, hidden_activation="silu"), "hidden_activation 'silu'"),
    "impossible shape": (lambda src: _edit_config(src, num_key_value_heads=3), "impossible model"),
    "missing tokenizer": (lambda src: (src / "tokenizer.model").unlink(), "no tokenizer.model"),
    "tokenizer not SentencePiece": (lambda src: (src / "tokenizer.model").write_bytes(b"\xff" * 16),
                                    "not a SentencePiece model"),
    "no safetensors": (_no_safetensors, r"no \*.safetensors files"),
    "missing shard file": (lambda src: (src / SHARD2).unlink(), "missing weights file"),
    "missing tensor": (lambda src: _edit_tensor(src, "model.layers.3.mlp.up_proj.weight"),
                       "lacks tensor model.layers.3.mlp.up_proj.weight"),
    "tensor missing from its shard": (_drop_from_file_only, "lacks tensor model.layers.0.input_layernorm.weight"),
    "shape mismatch": (lambda src: _edit_tensor(src, "model.layers.0.self_attn.k_proj.weight",
                                                np.zeros((64, 64), np.float32)),
                       r"k_proj.weight has shape \(64, 64\), config.json needs \(32, 64\)"),
    "kernel stored [in, out]": (lambda src: _edit_tensor(src, "model.layers.1.mlp.gate_proj.weight",
                                                         np.zeros((64, 128), np.float32)),
                                r"gate_proj.weight has shape \(64, 128\), config.json needs \(128, 64\)"),
    "integer tensor": (lambda src: _edit_tensor(src, "model.norm.weight", np.zeros(64, np.int32)), "dtype int32"),
    "untied head": (lambda src: _add_head(src, np.zeros((512, 64), np.float32)),
                    "lm_head.weight differs from the token embedding"),
    "untied config without head": (lambda src: _edit_config(src, tie_word_embeddings=False), "no lm_head.weight"),
    "vocab bigger than tokenizer": (_bigger_vocab, "tokenizer has 512 pieces but the model 520"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(src, tmp_path, case):
    damage, message = BAD[case]
    damage(src)
    out = tmp_path / "outdir" / "model"
    assert_refused_cleanly(lambda: import_safetensors(src, out), out, message)
