"""One artifact, its context chosen when it loads: the global caches are exported at a prime placeholder that the
LiteRT-LM engine rewrites into the context it is asked for (LiteRT's magic numbers). At contexts below, at and
above the sliding window the engine's greedy tokens are JAX's; `nano bench --max-tokens` loads it at a context.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench.run import bench, tflite_of
from export.bundle import read_provenance
from export.graph import MASK, context_placeholder, uses_mask
from export.run import export
from export.settings import ExportSettings
from nano.checkpoint import save_model
from nano.config import TINY
from nano.errors import NanoError
from nano.model import init_model
from nano.sampling import Generator, SamplingConfig

pytestmark = pytest.mark.slow

WINDOW = 16
CONFIG = dataclasses.replace(TINY, sliding_window=WINDOW)  # a window the short prompts below can straddle
MOST = 64


def test_the_placeholder_is_a_prime_above_the_context():
    assert [context_placeholder(n) for n in (64, 1024, 4096, 8192, 2)] == [67, 1031, 4099, 8209, 11]
    assert uses_mask(TINY, prefill=False) and uses_mask(TINY, prefill=True)  # global layers 1 and 3
    local_last = dataclasses.replace(TINY, num_layers=2)  # layer 1 is global and last: a prefill never attends there
    assert uses_mask(local_last, prefill=False) and not uses_mask(local_last, prefill=True)


@pytest.fixture(scope="module")
def bundle(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    model = init_model(CONFIG, seed=3)
    source = save_model(model, tiny_tokenizer, root / "model")
    result = export(str(source), root / "tiny.litertlm", ExportSettings(prefill_lengths=(4, 16), max_tokens=MOST))
    return model, result


def test_the_file_holds_the_placeholder_and_the_bundle_its_default(bundle, tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    _, result = bundle
    assert result["verification"]["ok"] and read_provenance(result["out"])["max_tokens"] == MOST
    tflite = tflite_of(Path(result["out"]), tmp_path)
    model = schema.ModelT.InitFromPackedBuf(tflite.read_bytes(), 0)
    placeholder = context_placeholder(MOST)
    for signature in model.signatureDefs:
        graph = model.subgraphs[signature.subgraphIndex]
        inputs = {t.name.decode(): graph.tensors[t.tensorIndex] for t in signature.inputs}
        length = inputs["tokens"].shape[1]
        assert list(inputs[MASK].shape) == [1, 1, length, placeholder]
        for name, tensor in inputs.items():
            if name.startswith("kv_cache_"):  # keys [kv_heads, slots, head_dim], values [kv_heads, head_dim, slots]
                assert tensor.shape[-2 if name.startswith("kv_cache_k_") else -1] in (placeholder, WINDOW)
        # Every dimension that names the context is the placeholder itself, k times: nothing else is a multiple.
        multiples = {int(d) for t in graph.tensors for d in t.shape if d > 0 and d % placeholder == 0}
        assert multiples and all(d // placeholder in (1, 2, 4) for d in multiples), multiples


@pytest.mark.parametrize("context", [12, WINDOW, 48])  # below, at and above the window; all below MOST
def test_engine_greedy_equals_jax_at_a_context_chosen_at_load(bundle, tiny_tokenizer, tmp_path, context):
    import litert_lm

    model, result = bundle
    prompt = "def"
    ids = [tiny_tokenizer.bos_id, *tiny_tokenizer.encode(prompt)]
    steps = context - len(ids) - 1  # the engine stops at its context
    want = Generator(model, SamplingConfig(temperature=0.0)).generate(ids, max_new_tokens=steps,
                                                                      stop_ids=tuple(tiny_tokenizer.stop_ids))
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with litert_lm.Engine(result["out"], backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(tmp_path),
                          max_num_tokens=context) as engine:
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=steps,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        session.run_prefill([prompt])
        text = session.run_decode().texts[0]
        assert steps > 3 and len(want) == steps  # the text fills the context: past the window at 48
        assert text == engine.detokenize(want)


def test_bench_loads_the_bundle_at_a_context(bundle):
    _, result = bundle
    common = dict(backend="litert-lm", threads=2, prefill_tokens=(4,), decode_tokens=4, repeats=1)
    small, default = bench(result["out"], max_tokens=24, **common), bench(result["out"], **common)
    assert small["context"] == 24 and default["context"] == MOST
    # The bandwidth line counts the global caches at the context the engine runs.
    local = 2 * 2 * CONFIG.num_kv_heads * WINDOW * CONFIG.head_dim * 4  # two local layers, K and V, float32
    per_slot = 2 * 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4  # two global layers
    assert small["kv_cache_bytes"] == local + 24 * per_slot and default["kv_cache_bytes"] == local + MOST * per_slot
    with pytest.raises(NanoError, match="holds at most 66 tokens"):
        bench(result["out"], max_tokens=67, **common)
    with pytest.raises(NanoError, match="--backend litert-lm"):
        bench(result["out"], max_tokens=24, **{**common, "backend": "litert"})
    assert np.isfinite(small["decode_tokens_per_s"])


def test_an_fp16_cache_halves_its_bytes_and_scores_like_float32(tiny_model_dir, corpus, tmp_path):
    """--kv-cache fp16: the caches are stored in float16 (attention computes in float32); through the artifact the
    perplexity of held-out text is float32's within 1%, and decode reads half the cache bytes."""
    results = {}
    for kv in ("float32", "fp16"):
        out = tmp_path / f"{kv}.litertlm"
        export(str(tiny_model_dir), out, ExportSettings(prefill_lengths=(4, 16), max_tokens=MOST, kv_cache=kv))
        results[kv] = bench(out, backend="litert", threads=2, prefill_tokens=(4,), decode_tokens=4, repeats=1,
                            text=(corpus / "heldout.txt").read_text()[:3000])
        assert read_provenance(out)["kv_cache"] == kv
    f32, f16 = results["float32"], results["fp16"]
    assert f16["ppl_tokens"] == f32["ppl_tokens"] > 500
    assert f16["ppl"] != f32["ppl"] and abs(f16["ppl"] / f32["ppl"] - 1) < 0.01
    assert f16["kv_cache_bytes"] * 2 == f32["kv_cache_bytes"]


def test_a_context_shorter_than_the_window(tiny_tokenizer, tmp_path):
    """--max-tokens below the sliding window: the local layers' caches hold the whole context (the placeholder,
    13 for 12), not a ring whose modulus the engine's rewrite could not reach; greedy equals JAX at 10 and 12."""
    import litert_lm

    model = init_model(CONFIG, seed=4)
    source = save_model(model, tiny_tokenizer, tmp_path / "model")
    out = export(str(source), tmp_path / "short.litertlm", ExportSettings(prefill_lengths=(4,), max_tokens=12))["out"]
    ids = [tiny_tokenizer.bos_id, *tiny_tokenizer.encode("def")]
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    for context in (10, 12):
        steps = context - len(ids) - 1
        want = Generator(model, SamplingConfig(temperature=0.0)).generate(ids, max_new_tokens=steps,
                                                                          stop_ids=tuple(tiny_tokenizer.stop_ids))
        with litert_lm.Engine(out, backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(tmp_path),
                              max_num_tokens=context) as engine:
            session = engine.create_session(apply_prompt_template=False, max_output_tokens=steps,
                                            sampler_config=litert_lm.SamplerConfig(top_k=1))
            session.run_prefill(["def"])
            assert steps > 2 and session.run_decode().texts[0] == engine.detokenize(want)
