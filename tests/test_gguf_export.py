"""`nano export-gguf`: the reverse of the GGUF import, checked by round trips, against gguf's own key and tensor
names, and in llama.cpp itself (the `peer` extra; those tests skip without it).

Round trips: export then `nano.gguf_import` gives the same parameters bit for bit and logits within 1e-5 (float32)
for the `tiny` preset, a model storing every setting, a depth-pruned model (a layer pattern no period describes),
an all-global one, a trimmed vocabulary and the embedded teacher.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

import student_models as sm
from cli.main import cli
from nano.checkpoint import float_params, load_config, load_model_dir, save_model_dir
from nano.config import GEMMA3_12B, GLOBAL, LOCAL, TINY
from nano.errors import NanoError
from nano.gguf_export import check_llama_cpp, export_gguf, tokenizer_fields
from nano.gguf_import import import_gguf
from nano.quant import quantize_params
from nano.quant_scheme import QuantScheme
from nano.tokenizer import Tokenizer

ARCH = "gemma3"
NEEDS_LLAMA_CPP = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama.cpp's bindings are the `peer` extra: run `make peer`")
LLAMA_CPP_ATOL = 0.02  # llama.cpp's f32 path vs ours on logits of tens: ~3e-3 seen; a misread setting gives 4-7


def _key(template) -> str:
    return template.format(arch=ARCH)


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _round_trip(src: Path, tmp: Path, **kwargs) -> tuple[Path, Path]:
    path = export_gguf(src, tmp / "model.gguf", **kwargs)
    return path, import_gguf(path, tmp / "back")


@pytest.fixture(scope="module")
def every_setting(tmp_path_factory, tiny_tokenizer):
    return sm.write_model(tmp_path_factory.mktemp("src") / "model", sm.EVERY_SETTING, tiny_tokenizer)


@pytest.fixture(scope="module")
def every_setting_gguf(every_setting, tmp_path_factory):
    return _round_trip(every_setting, tmp_path_factory.mktemp("gguf"))


# --- Round trips ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_preset_round_trip(tiny_model_dir, tmp_path):
    _, back = _round_trip(tiny_model_dir, tmp_path)
    sm.assert_same_model(tiny_model_dir, back)


@pytest.mark.slow
def test_every_setting_round_trip(every_setting, every_setting_gguf):
    sm.assert_same_model(every_setting, every_setting_gguf[1])
    # GGUF stores the epsilon as float32; everything else comes back as it was.
    src = load_config(every_setting)
    assert load_config(every_setting_gguf[1]) == dataclasses.replace(src, norm_eps=float(np.float32(src.norm_eps)))


@pytest.mark.slow
def test_depth_pruned_pattern_round_trip(tiny_tokenizer, tmp_path):
    """Layers 0, 1, 3 of tiny's local/global/local/global: local, global, global, which no period describes; the
    file lists one bool per layer (true: sliding window), as llama.cpp reads it."""
    src = sm.write_model(tmp_path / "src", TINY, tiny_tokenizer, layers=[0, 1, 3])
    assert load_config(src).layer_types == (LOCAL, GLOBAL, GLOBAL)
    path, back = _round_trip(src, tmp_path)
    assert _fields(path)[_key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)] == [True, False, False]
    sm.assert_same_model(src, back)


def test_regular_pattern_is_a_period(every_setting_gguf):
    assert _fields(every_setting_gguf[0])[_key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)] == TINY.global_every


@pytest.mark.slow
def test_all_global_round_trip(tiny_tokenizer, tmp_path):
    src = sm.write_model(tmp_path / "src", dataclasses.replace(TINY, sliding_window=None), tiny_tokenizer)
    path, back = _round_trip(src, tmp_path)
    fields = _fields(path)
    assert _key(gguf.Keys.Attention.SLIDING_WINDOW) not in fields  # llama.cpp: no window, every layer global
    assert load_config(back).sliding_window is None
    sm.assert_same_model(src, back)


@pytest.mark.slow
def test_trimmed_vocabulary_round_trip(tiny_tokenizer, tmp_path):
    keep = sm.trimmed_vocab_ids(tiny_tokenizer)
    src = sm.write_model(tmp_path / "src", TINY, tiny_tokenizer, vocab=keep)
    path, back = _round_trip(src, tmp_path)
    assert len(_fields(path)[gguf.Keys.Tokenizer.LIST]) == 400
    sm.assert_same_model(src, back)
    trimmed, again = Tokenizer.load(src / "tokenizer.model"), Tokenizer.load(back / "tokenizer.model")
    assert tokenizer_fields(again) == tokenizer_fields(trimmed)
    assert [trimmed.id_to_piece(i) for i in range(400)] == [tiny_tokenizer.id_to_piece(int(i)) for i in keep]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, qtype, cast", [("f16", Q.F16, np.float16), ("bf16", Q.BF16, None)])
def test_half_precision(every_setting, tmp_path, dtype, qtype, cast):
    import ml_dtypes

    path, back = _round_trip(every_setting, tmp_path, dtype=dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {Q.F32}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {qtype}
    ours, theirs = sm.params(every_setting), sm.params(back)
    rounded = lambda v: v.astype(cast or ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name] if name.endswith(".scale") else rounded(ours[name]))


# --- What the file says, against gguf's own names -------------------------------------------------------------

def test_metadata(every_setting_gguf, tiny_tokenizer):
    c, K = sm.EVERY_SETTING, gguf.Keys
    fields = _fields(every_setting_gguf[0])
    expected = {
        K.General.ARCHITECTURE: "gemma3",
        _key(K.LLM.CONTEXT_LENGTH): c.max_seq_len,
        _key(K.LLM.EMBEDDING_LENGTH): c.d_model,
        _key(K.LLM.BLOCK_COUNT): c.num_layers,
        _key(K.LLM.FEED_FORWARD_LENGTH): c.ffn_dim,
        _key(K.Attention.HEAD_COUNT): c.num_heads,
        _key(K.Attention.HEAD_COUNT_KV): c.num_kv_heads,
        _key(K.Attention.KEY_LENGTH): c.head_dim,
        _key(K.Attention.VALUE_LENGTH): c.head_dim,
        _key(K.Attention.SLIDING_WINDOW): c.sliding_window,
        _key(K.Rope.FREQ_BASE): 1e6,
        _key(K.Rope.FREQ_BASE_SWA): 5e3,
        _key(K.Rope.SCALING_TYPE): "linear",
        _key(K.Rope.SCALING_FACTOR): 8.0,
        _key(K.LLM.FINAL_LOGIT_SOFTCAPPING): 30.0,
        K.Tokenizer.MODEL: "llama",
        K.Tokenizer.BOS_ID: 2, K.Tokenizer.EOS_ID: 1, K.Tokenizer.UNK_ID: 3, K.Tokenizer.PAD_ID: 0,
        K.Tokenizer.ADD_BOS: True, K.Tokenizer.ADD_EOS: False,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields[_key(K.Attention.LAYERNORM_RMS_EPS)] == pytest.approx(1e-6, rel=1e-7)
    assert fields["nano.config_hash"] == c.hash
    sp = tiny_tokenizer.sp
    assert fields[K.Tokenizer.LIST] == [sp.id_to_piece(i) for i in range(512)]
    assert fields[K.Tokenizer.SCORES] == pytest.approx([sp.get_score(i) for i in range(512)])
    assert fields[K.Tokenizer.TOKEN_TYPE][:4] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                                  gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN]


def test_tensor_names_and_shapes(every_setting_gguf):
    """gguf's own table of gemma3 tensors (all but `output`: the head is the embedding), GGML shapes [in, out]."""
    c = sm.EVERY_SETTING
    tensors = {t.name: t for t in gguf.GGUFReader(every_setting_gguf[0]).tensors}
    kinds = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3]) - {gguf.MODEL_TENSOR.OUTPUT}
    names = {gguf.TENSOR_NAMES[k].format(bid=i) + ".weight" for k in kinds for i in range(c.num_layers)}
    assert set(tensors) == names
    shape = lambda name: tensors[name].shape.tolist()  # noqa: E731
    assert shape("token_embd.weight") == [c.d_model, c.vocab_size]
    assert shape("blk.0.attn_q.weight") == [c.d_model, c.num_heads * c.head_dim]
    assert shape("blk.3.ffn_down.weight") == [c.ffn_dim, c.d_model]
    assert shape("blk.1.attn_k_norm.weight") == [c.head_dim]


@pytest.mark.slow
def test_user_defined_pieces_carry_spaces(tiny_tokenizer, tmp_path):
    """llama.cpp's converter stores a user-defined piece's '▁' as ' '; the import turns it back."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto.FromString(tiny_tokenizer.proto)
    proto.pieces[300].piece, proto.pieces[300].type = "<tab>▁▁", sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    tokenizer = Tokenizer(proto.SerializeToString())
    pieces, _, types = tokenizer_fields(tokenizer)
    assert pieces[300] == "<tab>  " and types[300] == gguf.TokenType.USER_DEFINED

    src = save_model_dir(TINY, sm.trained_like(TINY), tokenizer, tmp_path / "src")
    back = Tokenizer.load(import_gguf(export_gguf(src, tmp_path / "t.gguf"), tmp_path / "back") / "tokenizer.model")
    assert back.id_to_piece(300) == "<tab>▁▁" and tokenizer_fields(back) == (pieces, *tokenizer_fields(tokenizer)[1:])


# --- Bad input, through the command line ----------------------------------------------------------------------

def _refused(tmp_path: Path, args: list, message: str) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_tokenizer):
    params = sm.trained_like(TINY)
    specs = QuantScheme(4, 32).tensor_specs(params, embeddings="int4")
    return save_model_dir(TINY, quantize_params(params, specs), tiny_tokenizer,
                          tmp_path_factory.mktemp("quantized") / "model", quant_info={"method": "rtn",
                                                                                      "scheme": "int4-b32"})


def test_quantized_dir_needs_dequantize(tiny_tokenizer, tmp_path):
    params = sm.trained_like(TINY)  # one tensor quantized makes a quantized directory (and keeps this test fast)
    specs = QuantScheme(4, 32).tensor_specs(["layers.0.mlp.up.kernel"], embeddings="float")
    src = save_model_dir(TINY, quantize_params(params, specs), tiny_tokenizer, tmp_path / "src",
                         quant_info={"method": "rtn", "scheme": "int4-b32"})
    out = tmp_path / "out" / "student.gguf"
    _refused(tmp_path, ["export-gguf", src, "--out", out], "is a quantized model (rtn int4-b32)")
    assert not out.parent.exists()


@pytest.mark.slow
def test_dequantize(quantized_dir, tmp_path):
    out = tmp_path / "student.gguf"
    result = CliRunner().invoke(cli, ["export-gguf", str(quantized_dir), "--out", str(out), "--dequantize"])
    assert result.exit_code == 0 and result.stdout.strip() == str(out), result.output
    back = import_gguf(out, tmp_path / "back")
    expected = float_params(load_model_dir(quantized_dir)[0])  # the codes times their scales
    for name, value in sm.params(back).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_existing_out_needs_force(every_setting, tmp_path):
    out = tmp_path / "student.gguf"
    out.write_bytes(b"mine")
    _refused(tmp_path, ["export-gguf", every_setting, "--out", out], "already exists (pass --force")
    assert out.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["student.gguf"]
    result = CliRunner().invoke(cli, ["export-gguf", str(every_setting), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "gemma3"


def test_unrepresentable_query_scale(tiny_tokenizer, tmp_path):
    """llama.cpp derives the query scale from the layer count; a model scaled otherwise (a Hugging Face import with
    query_pre_attn_scalar 24, or a depth-pruned 27B) cannot be written."""
    src = sm.write_model(tmp_path / "src", dataclasses.replace(TINY, query_pre_attn_scalar=24.0), tiny_tokenizer)
    out = tmp_path / "out" / "student.gguf"
    _refused(tmp_path, ["export-gguf", src, "--out", out], "llama.cpp's Gemma 3 loader cannot represent this model")
    assert not out.parent.exists()
    # Gemma 3 27B's shape (queries by 1/sqrt(d_model / heads) = 1/sqrt(168)) is what llama.cpp gives 62 layers only.
    gemma3_27b = dataclasses.replace(GEMMA3_12B, d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                                     head_dim=128, ffn_dim=21504, query_pre_attn_scalar=168.0)
    check_llama_cpp(gemma3_27b)
    with pytest.raises(NanoError, match=r"1/sqrt\(128\) for 40 layers .* this model by 1/sqrt\(168\)"):
        check_llama_cpp(dataclasses.replace(gemma3_27b, num_layers=40))  # depth-pruned


# --- In llama.cpp -------------------------------------------------------------------------------------------

_LLAMA_LOGITS = """
import sys, numpy as np
from llama_cpp import Llama
path, out, *ids = sys.argv[1:]
ids = [int(i) for i in ids]
llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, type_k=0, type_v=0, n_threads=2,
            verbose=False)  # type_k/v 0: a float32 KV cache
llm.eval(ids)
np.save(out, np.array([llm.scores[i] for i in range(len(ids))]))
"""


def llama_cpp_logits(path: Path, tokens) -> np.ndarray:
    """llama.cpp's logits in a child process (its OpenMP threads spin on after a call; keep them out of ours)."""
    out = path.with_suffix(".npy")
    proc = subprocess.run([sys.executable, "-c", _LLAMA_LOGITS, str(path), str(out), *map(str, tokens)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


@pytest.mark.slow
@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("case", ["every setting", "depth-pruned"])
def test_llama_cpp_computes_our_logits(case, every_setting, tiny_tokenizer, tmp_path):
    """llama.cpp reads the window, the per-layer pattern, both rope bases, rope scaling and the softcap as we mean
    them: its logits are ours within its float32 arithmetic (reading any one wrongly moves them by 4 or more)."""
    src = every_setting if case == "every setting" else sm.write_model(
        tmp_path / "src", sm.EVERY_SETTING, tiny_tokenizer, layers=[0, 1, 3])
    path = export_gguf(src, tmp_path / "model.gguf")
    delta = np.abs(llama_cpp_logits(path, sm.TOKENS) - sm.logits(src)).max()
    assert delta <= LLAMA_CPP_ATOL, delta


# --- The embedded teacher ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_gguf(teacher_dir, tmp_path_factory):
    return export_gguf("gemma3-270m", tmp_path_factory.mktemp("teacher") / "gemma3-270m.gguf")


@pytest.mark.slow
def test_teacher_round_trip(teacher_gguf, teacher_dir, tmp_path):
    back = import_gguf(teacher_gguf, tmp_path / "back")
    assert load_config(back) == load_config(teacher_dir)
    assert (back / "tokenizer.model").read_bytes() == (teacher_dir / "tokenizer.model").read_bytes()
    ours, theirs = sm.params(teacher_dir), sm.params(back)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    tokens = Tokenizer.load(teacher_dir / "tokenizer.model").encode("def fibonacci(n):\n    return n")
    np.testing.assert_array_equal(sm.logits(back, [2, *tokens]), sm.logits(teacher_dir, [2, *tokens]))


_LLAMA_PERPLEXITY = """
import json, sys
from bench.peer import gguf_perplexity
print(json.dumps(gguf_perplexity(sys.argv[1], open(sys.argv[2], encoding="utf-8").read(), threads=2, window=512)))
"""


@pytest.mark.slow
@NEEDS_LLAMA_CPP
def test_teacher_perplexity_in_llama_cpp(teacher_gguf, teacher, tmp_path):
    """llama.cpp runs our GGUF of the teacher at the JAX model's perplexity on held-out text (within 1%)."""
    from nano.corpus import corpus_text
    from nano.perplexity import perplexity

    text = corpus_text("heldout", max_chars=8000)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", _LLAMA_PERPLEXITY, str(teacher_gguf), str(tmp_path / "text.txt")],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.splitlines()[-1])
    ours = perplexity(*teacher, text, window=512)
    print(f"perplexity: llama.cpp {theirs['ppl']:.4f}, JAX {ours.ppl:.4f} over {ours.tokens} tokens")
    assert theirs["ppl_tokens"] == ours.tokens
    assert theirs["ppl"] == pytest.approx(ours.ppl, rel=0.01)
