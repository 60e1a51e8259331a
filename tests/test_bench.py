"""`nano bench` on a tiny exported artifact: sane figures, the JSON keys, perplexity through the artifact, errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.run import bench
from export.run import export
from export.settings import ExportSettings
from nano.cli import cli
from nano.errors import NanoError
from nano.perplexity import perplexity

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
    want = perplexity(tiny_model, tiny_tokenizer, text, window=result["ppl_window"]).ppl
    assert result["ppl"] == pytest.approx(want, rel=1e-4)


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
