"""`nano bench` on a tiny exported artifact: sane figures, the JSON keys, perplexity through the artifact, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bench.run import bench, bench_many
from export.run import export
from export.settings import ExportSettings
from cli.main import cli
from nano.config import TINY
from nano.errors import NanoError
from nano.perplexity import perplexity

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

SMALL = dict(prefill_lengths=(4, 16), max_tokens=64)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.litertlm"
    export(str(tiny_model_dir), out, ExportSettings(**SMALL))
    return out


@pytest.mark.parametrize("backend", ["litert", "litert-lm"])
def test_bench_reports_sane_figures(artifact, backend):
    result = bench(artifact, backend=backend, threads=2, prefill_tokens=(4, 16), decode_tokens=8, repeats=1)
    assert set(result["prefill_tokens_per_s"]) == {"4", "16"}
    assert all(rate > 0 for rate in result["prefill_tokens_per_s"].values())
    assert result["decode_tokens_per_s"] > 0 and 0 < result["time_to_first_token_s"] < 10
    assert result["file_bytes"] == artifact.stat().st_size and result["peak_rss_bytes"] > 0


def test_engine_benchmark_warms_up_in_the_loaded_engine(artifact, tmp_path):
    """Every generation in one loaded engine, the warm-up as the timed one, runs the engine's own benchmark at the
    asked sizes, its time to first token no shorter than its prefill."""
    from bench.engine import engine_benchmark

    infos = engine_benchmark(artifact, 2, 16, 8, tmp_path, runs=3)
    assert len(infos) == 3
    for info in infos:
        assert (info.last_prefill_token_count, info.last_decode_token_count) == (16, 8)
        assert info.last_prefill_tokens_per_second > 0 and info.last_decode_tokens_per_second > 0
        assert 16 / info.last_prefill_tokens_per_second <= info.time_to_first_token_in_second < 10


def test_bench_json_and_perplexity_match_nano_perplexity(artifact, tiny_model, tiny_tokenizer, tmp_path):
    """Through a float32 artifact the protocol gives `nano perplexity`'s figure (the bundle's own tokenizer)."""
    from hf_tiny import training_text

    text = "\n".join(training_text())[:3000]
    (tmp_path / "t.txt").write_text(text)
    out = CliRunner().invoke(cli, ["bench", str(artifact), "--prefill-tokens", "4", "--decode-tokens", "4",
                                   "--repeats", "1", "--text", str(tmp_path / "t.txt"), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "ppl", "time_to_first_token_s", "load_s"} <= set(result)
    want = perplexity(tiny_model, tiny_tokenizer, text, window=result["ppl_window"])
    assert result["ppl"] == pytest.approx(want.ppl, rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-4)


def test_several_artifacts_alternate_and_report_together(artifact, tmp_path):
    """Two artifacts in one run: each timed once per round, each with its own result, one report for both."""
    import shutil

    twin = tmp_path / "twin.litertlm"
    shutil.copy(artifact, twin)
    heard = []
    results = bench_many([artifact, twin], threads=2, prefill_tokens=(4,), decode_tokens=4, repeats=2,
                         progress=heard.append)
    assert [r["artifact"] for r in results] == [str(artifact), str(twin)]
    rounds = [m for m in heard if m.startswith("run ")]
    assert rounds == ["run 1/2: tiny.litertlm (litert)", "run 1/2: twin.litertlm (litert)",
                      "run 2/2: tiny.litertlm (litert)", "run 2/2: twin.litertlm (litert)"]
    out = CliRunner().invoke(cli, ["bench", str(artifact), str(twin), "--prefill-tokens", "4", "--decode-tokens",
                                   "4", "--repeats", "1", "--json", "--report", str(tmp_path / "report")])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output[out.output.index("["):])
    assert len(listed) == 2 and all(r["decode_tokens_per_s"] > 0 for r in listed)
    table = (tmp_path / "report" / "bench.md").read_text()
    assert "| tiny.litertlm |" in table and "| twin.litertlm |" in table


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="gpu"), "--backend must be one of"),
    (dict(prefill_tokens=(64,), decode_tokens=8), "exceed the artifact's context of 64"),
    (dict(repeats=0), "--repeats must be"),
])
def test_bench_bad_input(artifact, kwargs, message):
    with pytest.raises(NanoError, match=message):
        bench(artifact, threads=2, **kwargs)


def test_bench_missing_or_bare_files(tmp_path, artifact):
    with pytest.raises(NanoError, match="does not exist"):
        bench(tmp_path / "nope.litertlm")
    bare = tmp_path / "m.tflite"
    bare.write_bytes(b"")
    with pytest.raises(NanoError, match="runs a .litertlm bundle"):
        bench(bare, backend="litert-lm")


def test_decode_bytes_are_the_weights_and_the_cache(artifact, tiny_model, tmp_path):
    """Bytes per decoded token: every parameter once (float32 here) and every KV-cache slot."""
    from flax import nnx

    from bench.bandwidth import decode_bytes, memory_bandwidth
    from bench.run import tflite_of
    from export.runtime import TFLiteRunner

    tflite = tflite_of(artifact, tmp_path)
    read = decode_bytes(tflite)
    params = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(tiny_model, nnx.Param))) * 4
    cache = sum(int(np.prod(shape)) * 4 for shape in TFLiteRunner(tflite, threads=1).cache_shapes.values())
    assert read["kv_cache_bytes"] == cache
    # The converter folds the norm scales into the projections after them (a few vectors fewer) and adds small
    # constants of its own (RoPE tables, iotas): within a few percent of the parameters either way.
    assert 0.98 * params < read["weight_bytes"] < 1.1 * params
    assert 1e8 < memory_bandwidth(1, size=64 * 2**20, repeats=2) < 1e12


def test_bench_reports_the_bandwidth_limit_and_writes_a_report(artifact, tmp_path):
    out = CliRunner().invoke(cli, ["bench", str(artifact), "--prefill-tokens", "4,16", "--decode-tokens", "8",
                                   "--repeats", "2", "--threads", "2", "--report", str(tmp_path / "r"), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    assert result["decode_bytes_per_token"] == result["weight_bytes"] + result["kv_cache_bytes"]
    assert result["decode_tokens_per_s_limit"] == pytest.approx(
        result["memory_bandwidth_bytes_per_s"] / result["decode_bytes_per_token"])
    assert result["decode_bandwidth_fraction"] == pytest.approx(
        result["decode_tokens_per_s"] / result["decode_tokens_per_s_limit"])
    assert json.loads((tmp_path / "r" / "bench.json").read_text())[artifact.name] == result
    table = (tmp_path / "r" / "bench.md").read_text()
    assert f"| {artifact.name} | litert |" in table and f"{result['decode_tokens_per_s']:,.1f}" in table
    png = (tmp_path / "r" / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_missing_or_unusable_delegate_is_one_clear_error(artifact, tmp_path):
    with pytest.raises(NanoError, match="delegate library .*nope.so not found"):
        bench(artifact, delegate=str(tmp_path / "nope.so"))
    (tmp_path / "text.so").write_text("not a library")
    with pytest.raises(NanoError, match="cannot load .*text.so as a LiteRT external delegate: .*file too short"):
        bench(artifact, delegate=str(tmp_path / "text.so"))
    with pytest.raises(NanoError, match="libc.so.6 is not a LiteRT external delegate"):
        bench(artifact, delegate="libc.so.6")
    with pytest.raises(NanoError, match="--delegate runs through ai-edge-litert"):
        bench(artifact, backend="litert-lm", delegate=str(tmp_path / "text.so"))
    out = CliRunner().invoke(cli, ["bench", str(artifact), "--delegate", "/usr/lib/libedgetpu.so.1"])
    assert out.exit_code != 0
    assert out.output.strip().splitlines() == [
        "Error: delegate library /usr/lib/libedgetpu.so.1 not found (install the vendor's runtime, e.g. "
        "libedgetpu1-std for a Coral Edge TPU, and pass the path of its .so)"]
    out = CliRunner().invoke(cli, ["bench", str(artifact), "--delegate", "x.so", "--delegate-option", "usb:0"])
    assert out.exit_code != 0 and "expected KEY=VALUE, got 'usb:0'" in out.output


def test_vs_gguf_without_llama_cpp_says_how_to_get_it(artifact, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(NanoError, match="needs llama.cpp's bindings: run `make peer`"):
        bench(artifact, threads=2, prefill_tokens=(4,), decode_tokens=4, repeats=1, vs_gguf="gemma3-270m")
    with pytest.raises(NanoError, match="--vs-gguf nope.gguf does not exist"):
        bench(artifact, vs_gguf="nope.gguf")


def test_vs_gguf_alternates_with_llama_cpp_and_reports_ratios(artifact, monkeypatch, teacher_dir):
    """llama.cpp (the `peer` extra; skipped without it) on the embedded teacher's GGUF, between our runs, and its
    perplexity on the text, over the same tokens as ours would be."""
    pytest.importorskip("llama_cpp")
    import bench.run as run
    from hf_tiny import training_text
    from nano.tokenizer import Tokenizer

    text = "\n".join(training_text())[:2000]

    order, ours, peer = [], run._round_litert, run._round_gguf
    monkeypatch.setattr(run, "_round_litert", lambda *a: order.append("litert") or ours(*a))
    monkeypatch.setattr(run, "_round_gguf", lambda *a, **k: order.append("llama.cpp") or peer(*a, **k))
    result = bench(artifact, threads=2, prefill_tokens=(4, 16), decode_tokens=8, repeats=2, vs_gguf="gemma3-270m",
                   text=text)
    assert order == ["litert", "llama.cpp"] * 2
    peer = result["peer"]
    assert peer["gguf"].endswith(".gguf") and peer["file_bytes"] > 200 * 2**20 and peer["peak_rss_bytes"] > 0
    assert set(peer["prefill_tokens_per_s"]) == {"4", "16"} and peer["decode_tokens_per_s"] > 1
    assert peer["ppl_tokens"] == len(Tokenizer.load(teacher_dir / "tokenizer.model").encode(text))
    assert peer["ppl_window"] == result["ppl_window"] == 64
    from nano.resolve import load_model

    teacher, tokenizer = load_model(teacher_dir)  # llama.cpp runs int8 activations: ~1% from the float model
    assert peer["ppl"] == pytest.approx(perplexity(teacher, tokenizer, text, window=64).ppl, rel=0.03)
    assert result["ratios"]["decode"] == pytest.approx(result["decode_tokens_per_s"] / peer["decode_tokens_per_s"])
    assert result["ratios"]["prefill_16"] == pytest.approx(
        result["prefill_tokens_per_s"]["16"] / peer["prefill_tokens_per_s"]["16"])


@pytest.mark.slow
def test_vs_gguf_model_dir_quantized_by_llama_cpp(artifact, tiny_model_dir):
    """--vs-gguf MODEL_DIR --peer-quant Q4_0: the artifact's own float model, exported to GGUF and quantized by
    llama.cpp, runs beside it (the fair comparison: the same float model, their 4-bit and ours)."""
    pytest.importorskip("llama_cpp")
    with pytest.raises(NanoError, match="--peer-quant"):
        bench(artifact, vs_gguf=str(tiny_model_dir), peer_quant="Q5_1")
    with pytest.raises(NanoError, match="--peer-quant"):
        bench(artifact, peer_quant="Q4_0")
    result = bench(artifact, threads=2, prefill_tokens=(4,), decode_tokens=4, repeats=1, vs_gguf=str(tiny_model_dir),
                   peer_quant="Q4_0", text=" ".join(["Kalo mine the ruthe."] * 20))  # no space runs: the tiny
    # tokenizer's SentencePiece normaliser collapses them, which GGUF cannot say (Gemma's has no normaliser)
    peer = result["peer"]
    assert peer["gguf"] == f"{tiny_model_dir} (Q4_0 by llama.cpp)" and peer["peer_quant"] == "Q4_0"
    # 4.5 bits per weight beside the float32 norms and the tokenizer: well under the float32 weights
    assert 0 < peer["file_bytes"] < TINY.param_count * 4 / 3
    assert peer["decode_tokens_per_s"] > 1 and peer["ppl_tokens"] == result["ppl_tokens"]
    assert peer["ppl"] == pytest.approx(result["ppl"], rel=0.2)


@pytest.fixture(scope="module")
def proxy_delegate(tmp_path_factory):
    """tests/delegate/proxy_delegate.c built here: a real external delegate (skipped without a C compiler)."""
    import shutil
    import subprocess
    from pathlib import Path

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the test delegate")
    out = tmp_path_factory.mktemp("delegate") / "libproxy_delegate.so"
    source = Path(__file__).parent / "delegate" / "proxy_delegate.c"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(source)], check=True)
    return out


def _first_signature_ops(tflite) -> list[int]:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite.read_bytes(), 0)
    graph = model.Subgraphs(0)
    codes = [model.OperatorCodes(graph.Operators(i).OpcodeIndex()) for i in range(graph.OperatorsLength())]
    return [max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes]


def test_bench_through_an_external_delegate(artifact, proxy_delegate, tmp_path):
    """The delegate takes exactly the operations it claims (FULLY_CONNECTED here) of the first signature, prefill
    and decode run through it, and perplexity through it is the CPU's."""
    from ai_edge_litert import schema_py_generated as schema
    from hf_tiny import training_text

    from bench.run import tflite_of

    fully_connected = schema.BuiltinOperator.FULLY_CONNECTED
    ops = _first_signature_ops(tflite_of(artifact, tmp_path))
    text = "\n".join(training_text())[:1500]
    figures = dict(threads=2, prefill_tokens=(4, 16), decode_tokens=8, repeats=1, text=text)
    cpu = bench(artifact, **figures)
    through = bench(artifact, delegate=str(proxy_delegate), delegate_options={"ops": str(fully_connected)}, **figures)
    assert through["nodes"] == len(ops) and through["delegated_nodes"] == ops.count(fully_connected) > 0
    assert through["decode_tokens_per_s"] > 0 and set(through["prefill_tokens_per_s"]) == {"4", "16"}
    assert through["ppl"] == pytest.approx(cpu["ppl"], rel=1e-3) and through["ppl_tokens"] == cpu["ppl_tokens"]
    with pytest.raises(NanoError, match="took none of the .* operations of .*the model cannot run there"):
        bench(artifact, delegate=str(proxy_delegate), delegate_options={"ops": "none"}, **figures)
    with pytest.raises(NanoError, match="refused to start: proxy delegate: cannot create"):
        bench(artifact, delegate=str(proxy_delegate), delegate_options={"fail_create": "1"}, **figures)
    with pytest.raises(NanoError, match="failed on model.tflite: .*proxy delegate: refusing"):
        bench(artifact, delegate=str(proxy_delegate), delegate_options={"fail_prepare": "1"}, **figures)
