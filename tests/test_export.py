"""`nano-export`: the real LiteRT converter, runtime and LiteRT-LM engine on the `tiny` preset (window 8, so a
64-slot context crosses the sliding window many times)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from checks import assert_refused_cleanly
from export import bundle
from export.graph import cache_names, context_placeholder
from export.run import export
from export.runtime import TFLiteRunner
from export.settings import ExportSettings
from export.weights import read_back, tflite_layout
from nano.checkpoint import flat_params, load_model_dir, save_model
from nano.config import TINY
from nano.kv_cache import KVCache
from nano.model import init_model
from nano.quant import QuantizedWeight
from nano.sampling import Generator, SamplingConfig
from quantize.pipeline import quantize_model
from quantize.settings import QuantizeSettings

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them

CONTEXT = 64
SMALL = dict(prefill_lengths=(4, 16), max_tokens=CONTEXT)
NANO_EXPORT = Path(sys.executable).parent / "nano-export"


@pytest.fixture(scope="module")
def float_export(tiny_model_dir, tmp_path_factory):
    """The tiny model as float32 .litertlm and .tflite (both verified by the export itself)."""
    out = tmp_path_factory.mktemp("export")
    bundled = export(str(tiny_model_dir), out / "tiny.litertlm", ExportSettings(**SMALL))
    plain = export(str(tiny_model_dir), out / "tiny.tflite", ExportSettings(**SMALL))
    return bundled, plain


@pytest.fixture(scope="module")
def gptq_dir(tiny_model, tiny_tokenizer, tmp_path_factory):
    calibration = tmp_path_factory.mktemp("calib") / "text.txt"
    from hf_tiny import training_text

    calibration.write_text("\n".join(training_text()))
    settings = QuantizeSettings(method="gptq", block_size=32, calibration=str(calibration), samples=8, seq_len=32)
    qmodel, info = quantize_model(tiny_model, tiny_tokenizer, settings)
    return save_model(qmodel, tiny_tokenizer, tmp_path_factory.mktemp("gptq") / "model", quant_info=info)


def _window(tokenizer, n):
    from export.verify import verification_window

    return verification_window(tokenizer, n, TINY.vocab_size)[0]


def test_float32_export_matches_jax_through_every_signature(float_export, tiny_model, tiny_tokenizer):
    _, plain = float_export
    assert plain["verification"]["ok"] and plain["verification"]["max_abs_logit_diff"] <= 1e-3
    runner = TFLiteRunner(plain["out"], threads=2)
    assert runner.prefill_lengths == [4, 16]
    window = _window(tiny_tokenizer, CONTEXT)
    expected = np.asarray(tiny_model(jnp.asarray(window[None]))[0][0])
    # Prefill 16 + 4 + a padded 4 (23 tokens), then decode past the window to the end of the context.
    runner.prefill(window[:23])
    got = np.stack([runner.decode(int(window[p]), p) for p in range(23, CONTEXT - 1)])
    assert np.abs(got - expected[23:CONTEXT - 1]).max() <= 1e-3
    # Each prefill length alone, from a fresh start (positions restart: no stale slot may be seen).
    for n in (4, 16):
        runner.prefill(window[:n])
        assert np.abs(runner.decode(int(window[n]), n) - expected[n]).max() <= 1e-3


def test_cache_layout_is_the_models_ring(float_export, tiny_model, tiny_tokenizer):
    """What the artifact's prefill writes into each kv_cache_* buffer equals the JAX model's KVCache after the same
    tokens: global layers [kv_heads, context, head_dim], values transposed (in the file, the context placeholder:
    the smallest prime above it, which the engine rewrites at load), local layers a ring of window slots (position
    p in slot p % window), K and V alike."""
    _, plain = float_export
    runner = TFLiteRunner(plain["out"], threads=2)
    shapes = runner.cache_shapes
    assert list(shapes) == cache_names(TINY)
    placeholder = context_placeholder(CONTEXT)
    assert placeholder == 67 and runner.max_tokens == placeholder and runner.context_at_load
    for i, layer_type in enumerate(TINY.layer_types):
        slots = placeholder if layer_type == "global" else TINY.sliding_window
        # The model's cache without its batch axis, values transposed (nano.kv_cache.KVCache)
        assert shapes[f"kv_cache_k_{i}"] == (TINY.num_kv_heads, slots, TINY.head_dim)
        assert shapes[f"kv_cache_v_{i}"] == (TINY.num_kv_heads, TINY.head_dim, slots)
    window = _window(tiny_tokenizer, 21)
    runner.prefill(window)  # 16 + a padded 16 (5 real rows): the padding must not land in the ring
    positions = jnp.arange(21)[None]
    _, cache = tiny_model(jnp.asarray(window[None]), positions, cache=KVCache.zeros(TINY, 1, placeholder))
    for i in range(TINY.num_layers):
        for name, want in ((f"kv_cache_k_{i}", cache.k[i]), (f"kv_cache_v_{i}", cache.v[i])):
            shape = shapes[name]
            got = runner.cache[name].read(int(np.prod(shape)), np.float32).reshape(shape)
            np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-4)  # the batch of one


def test_prefill_chunks_that_wrap_the_ring_and_reach_the_context_end(float_export, tiny_model, tiny_tokenizer):
    """A prefill chunk is written with dynamic-update-slices of its own length (nano.kv_cache): through the runtime,
    chunks that wrap past the 8-slot rings' end, padded chunks, and a padded last chunk whose padding reaches past
    the global caches' last slot leave every cache as JAX writes a batch's (selecting over the whole cache), and the
    token decoded after them in the last slot scores as the full sequence does."""
    _, plain = float_export
    runner = TFLiteRunner(plain["out"], threads=2)
    slots = runner.max_tokens  # 67: the placeholder, as the file holds it
    window = _window(tiny_tokenizer, slots)
    runner.prefill(window[:6])  # 4 + a padded 4
    runner.prefill(window[6:13], start=6)  # 4 at positions 6..9 (ring slots 6, 7, 0, 1) + a padded 4
    runner.prefill(window[13:slots - 1], start=13)  # 16 x 3, 4 wrapping, then 1 row padded past slot 66
    batch = jnp.tile(jnp.asarray(window[None, :slots - 1]), (2, 1))
    _, cache = tiny_model(batch, jnp.tile(jnp.arange(slots - 1)[None], (2, 1)), cache=KVCache.zeros(TINY, 2, slots))
    for i in range(TINY.num_layers):
        for name, want in ((f"kv_cache_k_{i}", cache.k[i]), (f"kv_cache_v_{i}", cache.v[i])):
            shape = runner.cache_shapes[name]
            got = runner.cache[name].read(int(np.prod(shape)), np.float32).reshape(shape)
            np.testing.assert_allclose(got, np.asarray(want)[1], atol=1e-4, err_msg=name)
    expected = np.asarray(tiny_model(jnp.asarray(window[None]))[0][0, slots - 1])
    assert np.abs(runner.decode(int(window[slots - 1]), slots - 1) - expected).max() <= 1e-3


def _engine_greedy_equals_jax(path, model, tokenizer, cache_dir) -> tuple[list[int], list[int]]:
    """The LiteRT-LM engine's greedy text from the .litertlm at `path` is the JAX model's greedy tokens, 32 steps
    past a prompt longer than the window; returns the prompt's ids and those tokens. The engine takes and returns
    text only, so JAX's ids are detokenized by the engine's own tokenizer."""
    import litert_lm

    prompt = "def fibonacci(n):\n    return"
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(thread_count=2),
                          cache_dir=str(cache_dir)) as engine:
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        assert engine.tokenize(prompt) == ids[1:] and engine.bos_token_id == tokenizer.bos_id
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=32,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        session.run_prefill([prompt])
        text = session.run_decode().texts[0]
        want = Generator(model, SamplingConfig(temperature=0.0)).generate(
            ids, max_new_tokens=32, stop_ids=tuple(tokenizer.stop_ids))
        assert len(ids) > model.config.sliding_window and len(want) == 32 and len(set(want)) > 1
        assert text == engine.detokenize(want)
    return ids, want


def test_engine_greedy_equals_jax_greedy(float_export, tiny_model, tiny_tokenizer, tmp_path):
    ids, want = _engine_greedy_equals_jax(float_export[0]["out"], tiny_model, tiny_tokenizer, tmp_path)
    # The Python runner reproduces the engine's loop in token ids.
    assert TFLiteRunner(float_export[1]["out"], threads=2).greedy(ids, 32) == want


def test_one_kv_head_exports_rank_2_caches_the_engine_runs(tiny_tokenizer, tmp_path):
    """With one KV head (every small Gemma 3) each exported cache is a bare [slots, head_dim] / [head_dim, slots]
    matrix, whose slot axis the bundle's metadata names for the engine; the engine's greedy tokens are JAX's."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as pb

    from bench.run import tflite_of

    config = dataclasses.replace(TINY, num_kv_heads=1)
    model = init_model(config, seed=1)
    out = export(str(save_model(model, tiny_tokenizer, tmp_path / "model")), tmp_path / "mqa.litertlm",
                 ExportSettings(**SMALL))
    shapes = TFLiteRunner(tflite_of(Path(out["out"]), tmp_path), threads=1).cache_shapes
    placeholder = context_placeholder(CONTEXT)
    for i, layer_type in enumerate(config.layer_types):
        slots = placeholder if layer_type == "global" else config.sliding_window
        assert shapes[f"kv_cache_k_{i}"] == (slots, config.head_dim)
        assert shapes[f"kv_cache_v_{i}"] == (config.head_dim, slots)
    meta = pb.ExecutorMetadata.FromString(bundle.executor_metadata(config))
    axes = {b.decode_input_name: b.sequence_axis for b in meta.llm_executor_metadata.state_buffers}
    assert axes["kv_cache_k_0"] == 0 and axes["kv_cache_v_0"] == 1
    _engine_greedy_equals_jax(out["out"], model, tiny_tokenizer, tmp_path)


def test_bundle_carries_metadata_and_provenance(float_export, tiny_model):
    import litert_lm

    bundled, _ = float_export
    info = litert_lm.ModelInfo(bundled["out"])
    assert info.is_llm_model
    provenance = bundle.read_provenance(Path(bundled["out"]))
    assert provenance["config_hash"] == TINY.hash and provenance["quant"] == "float32"
    assert provenance["max_tokens"] == CONTEXT and provenance["versions"]["litert-converter"]


def test_int4_codes_reach_the_file_unchanged(gptq_dir, float_export, tmp_path):
    """A GPTQ model's own codes and scales are in the .tflite (read back from the flatbuffer), one tensor per
    weight (the tied embedding shared by lookup and head), and the artifact's perplexity is within 2% of JAX's."""
    result = export(str(gptq_dir), tmp_path / "gptq.tflite", ExportSettings(**SMALL))
    assert result["quant"] == "int4-b32" and result["verification"]["ok"]
    assert abs(result["verification"]["ppl_ratio"] - 1) <= 0.02
    model, _ = load_model_dir(gptq_dir)
    weights = {n: w for n, w in flat_params(model).items() if isinstance(w, QuantizedWeight)}
    stored = list(read_back(tmp_path / "gptq.tflite"))
    assert len(stored) == len(weights) == result["int_weights_read_back"]
    for name, weight in weights.items():
        codes, scales = tflite_layout(weight)
        match = [s for s in stored if s["codes"].shape == codes.shape and np.array_equal(s["codes"], codes)]
        assert len(match) >= 1, name
        assert match[0]["block_size"] == weight.spec.block_size
        np.testing.assert_array_equal(np.asarray(match[0]["scales"], np.float32).reshape(-1),
                                      np.asarray(scales, np.float32).reshape(-1))
    # 4.5 bits per projection weight and 8 per embedding weight, against float32's 32, plus the float32 Hadamard
    # matrices of the rotations (nano.rotation), one constant per block size.
    hadamard_bytes = sum(4 * b * b for b in {model.config.ffn_rotation, model.config.input_rotation} if b)
    assert result["bytes"] < 0.4 * float_export[1]["bytes"] + hadamard_bytes


def test_int8_projections_beside_int4_reach_the_file(tiny_model, tiny_tokenizer, tmp_path):
    """`nano quantize --int8 mlp.down`: the down kernels' int8 per-channel codes and the rest's int4 blocks are
    all in the .tflite as they are in the model, and the artifact verifies against the device model."""
    calibration = tmp_path / "text.txt"
    from hf_tiny import training_text

    calibration.write_text("\n".join(training_text()))
    settings = QuantizeSettings(method="gptq", calibration=str(calibration), samples=8, seq_len=32, int8=("mlp.down",))
    qmodel, info = quantize_model(tiny_model, tiny_tokenizer, settings)
    model_dir = save_model(qmodel, tiny_tokenizer, tmp_path / "mixed", quant_info=info)
    result = export(str(model_dir), tmp_path / "mixed.tflite", ExportSettings(**SMALL))
    assert result["verification"]["ok"]
    stored = list(read_back(tmp_path / "mixed.tflite"))
    kinds = set()
    for name, weight in flat_params(qmodel).items():
        if isinstance(weight, QuantizedWeight) and name.endswith(".kernel"):
            codes, scales = tflite_layout(weight)
            match = [s for s in stored if s["codes"].shape == codes.shape and np.array_equal(s["codes"], codes)
                     and np.array_equal(np.asarray(s["scales"], np.float32).reshape(-1),
                                        np.asarray(scales, np.float32).reshape(-1))]
            assert match, name
            kinds.add((name.endswith("mlp.down.kernel"), weight.spec.bits))
    assert kinds == {(True, 8), (False, 4)}


def _graph(path):
    """(model object, {op name: [(subgraph, operator)]}) of a .tflite, parsed with the TFLite schema."""
    import mmap

    from ai_edge_litert import schema_py_generated as schema

    from export.weights import read_flatbuffer

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as file:
        model = read_flatbuffer(file)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = {}
    for graph in model.subgraphs:
        for op in graph.operators:
            ops.setdefault(names[model.operatorCodes[op.opcodeIndex].builtinCode], []).append((graph, op))
    return model, ops


def _table(path):
    return next(s for s in read_back(path) if s["codes"].shape == (TINY.vocab_size, TINY.d_model))


@pytest.mark.parametrize("quant", ["int8", "int4-b32", "fp16"])
def test_float_model_quantized_on_the_way(tiny_model_dir, tmp_path, quant):
    """RTN on the way, the embedding table at the scheme's bits; fp16 weights are FLOAT16 constants behind
    DEQUANTIZE ops (the pattern XNNPACK loads as float16 weights)."""
    from ai_edge_litert import schema_py_generated as schema

    result = export(str(tiny_model_dir), tmp_path / f"{quant}.tflite", ExportSettings(quant=quant, **SMALL))
    assert result["verification"]["ok"] and result["quant"] == quant
    n_int = 0 if quant == "fp16" else 4 * 7 + 1
    assert result["int_weights"] == result["int_weights_read_back"] == n_int
    if quant == "fp16":
        _, ops = _graph(result["out"])
        producers = {(id(g), o.outputs[0]): o for g, o in ops["DEQUANTIZE"]}
        for graph, op in ops["FULLY_CONNECTED"] + ops["EMBEDDING_LOOKUP"]:
            dequantize = producers[(id(graph), op.inputs[1])]
            assert graph.tensors[dequantize.inputs[0]].type == schema.TensorType.FLOAT16
    else:
        table = _table(result["out"])
        in_int4_range = table["codes"].min() >= -8 and table["codes"].max() <= 7
        assert (table["block_size"], in_int4_range) == ((32, True) if quant == "int4-b32" else (0, False))


def test_weights_sit_after_the_flatbuffer_shared_by_every_signature(float_export, tiny_model):
    """Every weight is a constant whose bytes follow the flatbuffer at (offset, size), written once and shared by
    the signatures that use it, and equal to the model's (kernels in FULLY_CONNECTED's [out, in] layout); the
    signatures take only tokens, positions, the engine's mask and caches."""
    path = float_export[1]["out"]
    model, ops = _graph(path)
    params = {n: np.asarray(v) for n, v in flat_params(tiny_model).items()}
    data = Path(path).read_bytes()
    header = min(b.offset for b in model.buffers if b.offset > 1)
    assert header < len(data)
    for signature in model.signatureDefs:
        names = {t.name.decode() for t in signature.inputs}
        assert names == {"tokens", "input_pos", "mask", *(n for n in names if n.startswith("kv_cache_"))}
    weight_buffers = {graph.tensors[op.inputs[1]].buffer for graph, op in ops["FULLY_CONNECTED"]}
    assert len(weight_buffers) == 4 * 7 + 1  # 7 projections per layer and the tied head, each stored once
    table = {graph.tensors[op.inputs[1]].buffer for graph, op in ops["EMBEDDING_LOOKUP"]}
    assert len(table) == 1 and table <= weight_buffers  # one table for the lookup (every signature) and the head
    buffer = model.buffers[table.pop()]
    stored = np.frombuffer(data[buffer.offset:buffer.offset + buffer.size], np.float32)
    np.testing.assert_array_equal(stored.reshape(TINY.vocab_size, TINY.d_model), params["embedder.embedding"])
    q_proj = next(graph.tensors[op.inputs[1]] for graph, op in ops["FULLY_CONNECTED"]
                  if tuple(graph.tensors[op.inputs[1]].shape) == (TINY.num_heads * TINY.head_dim, TINY.d_model))
    buffer = model.buffers[q_proj.buffer]
    assert buffer.offset >= header and buffer.offset % 16 == 0
    kernels = [params[f"layers.{i}.attn.q_proj.kernel"].T for i in range(TINY.num_layers)]
    stored = np.frombuffer(data[buffer.offset:buffer.offset + buffer.size], np.float32).reshape(q_proj.shape)
    assert any(np.array_equal(stored, k) for k in kernels)


def test_embeddings_option(tiny_model_dir, gptq_dir, tmp_path):
    result = export(str(tiny_model_dir), tmp_path / "e8.tflite",
                    ExportSettings(quant="int4-b32", embeddings="int8", **SMALL))
    assert result["verification"]["ok"] and _table(result["out"])["block_size"] == 0
    assert _table(result["out"])["codes"].max() > 7  # int8 codes
    out = tmp_path / "out" / "m.tflite"
    assert_refused_cleanly(lambda: export(str(gptq_dir), out, ExportSettings(embeddings="int8", **SMALL)), out,
                           "--embeddings applies when a float model is quantized")


@pytest.mark.parametrize("case, settings, message", [
    ("unknown quant", dict(quant="int3"), "--quant must be one of"),
    ("prefill above context", dict(prefill_lengths=(128,), max_tokens=64), "prefill length 128 exceeds --max-tokens"),
    ("context above the model's", dict(max_tokens=1024), "exceeds the model's context of 256"),
    ("verification of one token", dict(verify_tokens=1), "verification needs at least 2 tokens"),
    ("tolerance above 1", dict(ppl_tolerance=1.5), "--ppl-tolerance must be a fraction between 0 and 1"),
])
def test_bad_settings_are_refused_cleanly(tiny_model_dir, tmp_path, case, settings, message):
    out = tmp_path / "out" / "m.litertlm"
    assert_refused_cleanly(lambda: export(str(tiny_model_dir), out, ExportSettings(**settings)), out, message)


def test_not_a_model_and_requantizing_are_refused(tmp_path, gptq_dir):
    out = tmp_path / "out" / "m.tflite"
    (tmp_path / "empty").mkdir()
    assert_refused_cleanly(lambda: export(str(tmp_path / "empty"), out, ExportSettings(**SMALL)), out,
                           "not a model directory")
    assert_refused_cleanly(lambda: export(str(gptq_dir), out, ExportSettings(quant="int8", **SMALL)), out,
                           "would requantize its codes")


def test_random_init_preset(tmp_path):
    """A preset with random weights exports and verifies (on pseudo-random ids: `tiny` has no tokenizer file), and
    with no tokenizer a .litertlm is refused in one line."""
    result = export("tiny", tmp_path / "tiny.tflite", ExportSettings(random_init=True, **SMALL))
    assert result["verification"]["ok"] and result["verification"]["text"] == f"{CONTEXT} pseudo-random token ids"
    assert TFLiteRunner(result["out"], threads=2).prefill_lengths == [4, 16]
    out = tmp_path / "out" / "tiny.litertlm"
    assert_refused_cleanly(lambda: export("tiny", out, ExportSettings(random_init=True, **SMALL)), out,
                           "no tokenizer with its 512-piece vocabulary")


def test_failed_verification_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from export import verify

    monkeypatch.setattr(verify, "FLOAT_TOLERANCE", 0.0)  # no artifact is bit-exact: verification must fail
    out = tmp_path / "out" / "m.litertlm"
    assert_refused_cleanly(lambda: export(str(tiny_model_dir), out, ExportSettings(**SMALL)), out,
                           r"verification failed: max \|Δlogit\| .* exceeds 0")


def test_ppl_tolerance_decides_an_integer_artifact(tiny_model_dir, tmp_path):
    """The int8 artifact's perplexity is off JAX's by its measured ratio: a tolerance below that gap refuses the
    export (saying how far it was and which option sets the limit), one above it accepts the same artifact."""
    result = export(str(tiny_model_dir), tmp_path / "a.tflite", ExportSettings(quant="int8", **SMALL))
    gap = abs(result["verification"]["ppl_ratio"] - 1)
    assert result["verification"]["tolerance"] == 0.02 and 0 < gap <= 0.02
    out = tmp_path / "out" / "b.tflite"
    assert_refused_cleanly(lambda: export(str(tiny_model_dir), out, ExportSettings(quant="int8", ppl_tolerance=gap / 2,
                                                                                   **SMALL)),
                           out, r"verification failed: perplexity .*device.*--ppl-tolerance")
    again = export(str(tiny_model_dir), out, ExportSettings(quant="int8", ppl_tolerance=gap * 2, **SMALL))
    assert again["verification"]["ok"] and again["verification"]["ppl_ratio"] == result["verification"]["ppl_ratio"]


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    out = tmp_path / "m.litertlm"
    for args, message in [(["--quant", "int3"], "Invalid value for '--quant'"),
                          (["--prefill-lengths", "128", "--max-tokens", "64"], "exceeds --max-tokens"),
                          (["--out", str(tmp_path / "m.onnx")], "--out must end in")]:
        argv = [str(NANO_EXPORT), str(tiny_model_dir), "--out", str(out), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert proc.stdout == "" and not out.exists() and not (tmp_path / "m.onnx").exists()
    proc = subprocess.run([str(NANO_EXPORT), str(tmp_path / "nowhere"), "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("Error:")]
    assert proc.returncode == 1 and len(error_lines) == 1 and "neither a model directory" in error_lines[0]


def test_nano_export_is_the_same_command():
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0 and "--prefill-lengths" in result.output and "--random-init" in result.output


def test_int4_embedding_directory(tiny_model, tiny_tokenizer, tmp_path):
    """`nano quantize --embeddings int4`: the lookup table (shared with the head) is int4 in blocks in the file."""
    qmodel, info = quantize_model(tiny_model, tiny_tokenizer, QuantizeSettings(method="rtn", embeddings="int4"))
    source = save_model(qmodel, tiny_tokenizer, tmp_path / "model", quant_info=info)
    result = export(str(source), tmp_path / "e4.tflite", ExportSettings(**SMALL))
    assert result["verification"]["ok"] and result["int_weights_read_back"] == result["int_weights"] == 29
    table = [s for s in read_back(tmp_path / "e4.tflite") if s["codes"].shape == (TINY.vocab_size, TINY.d_model)]
    assert len(table) == 1 and table[0]["block_size"] == 32 and table[0]["codes"].min() >= -8
