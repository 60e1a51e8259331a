"""`nano prune` end to end on `tiny`, and a pruned student through the stages after it: distilled across its
trimmed vocabulary (online, cached, on-policy), and exported.

What is checked: pruning nothing gives the teacher back (logits identical); prune.json and prune.png say what was
kept and measured; every bad input is one error line with nothing written; a trimmed-vocabulary student trains
against its teacher (the teacher reads the student's tokens as its own ids), a cached teacher equals an online
one, a cache made for another vocabulary is refused; the pruned student's artifact computes what JAX computes.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from checks import assert_refused_cleanly
from cli.main import cli
from hf_tiny import training_text
from nano.checkpoint import flat_params, load_model_dir, save_model_dir
from nano.config import GLOBAL, LOCAL, TINY
from nano.quant import quantize_params
from nano.quant_scheme import QuantScheme
from prune.run import prune
from prune.settings import PruneSettings, parse_layers

pytestmark = pytest.mark.slow  # every test here loads, prunes and writes models

VOCAB = 320  # of the tiny tokenizer's 512; its required pieces (specials, bytes, '▁') are 261


def nano(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, corpus):
    """tiny pruned along every axis: 3 of 4 layers, 96 of 128 FFN neurons, 2 of 4 heads, 48 of 64 channels,
    320 of 512 pieces."""
    out = tmp_path_factory.mktemp("pruned") / "student"
    settings = PruneSettings(calibration=(str(corpus / "train.txt"),), layers=3, ffn_dim=96, num_heads=2,
                             d_model=48, vocab_size=VOCAB, samples=8, seq_len=32)
    return out, prune(str(tiny_model_dir), out, settings)


def test_pruning_nothing_gives_the_teacher(tmp_path, tiny_model_dir, tiny_model, corpus):
    out = tmp_path / "same"
    nano("prune", tiny_model_dir, "--out", out, "--calibration", corpus / "train.txt")
    student, tokenizer = load_model_dir(out)
    assert student.config == TINY
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(student(tokens)[0]), np.asarray(tiny_model(tokens)[0]))
    record = json.loads((out / "prune.json").read_text())
    assert record["kept"] == {} and record["student"]["params"] == record["teacher"]["params"] == TINY.param_count


def test_pruned_student_is_what_prune_json_says(pruned, tiny_model, tiny_tokenizer):
    out, record = pruned
    student, tokenizer = load_model_dir(out)
    c = student.config
    assert (c.num_layers, c.ffn_dim, c.num_heads, c.d_model, c.vocab_size) == (3, 96, 2, 48, VOCAB)
    assert tokenizer.vocab_size == VOCAB and c.param_count == record["student"]["params"] < TINY.param_count
    kept = record["kept"]
    assert len(kept["layers"]) == 3 and len(kept["channels"]) == 48 and len(kept["vocab"]) == VOCAB
    assert c.layer_types == tuple(TINY.layer_types[i] for i in kept["layers"])  # each layer keeps its kind
    # the depth scores were measured and the kept layers are the costliest to drop
    drop = np.asarray(record["scores"]["drop_nll"])
    assert len(drop) == TINY.num_layers and set(kept["layers"]) == set(np.argsort(-drop)[:3].tolist())
    assert -1 <= record["depth_rank_correlation"] <= 1
    assert record["seconds"] > 0 and record["peak_rss_bytes"] > 2 ** 20  # what the note reports: time and memory
    # kept rows of the embedding: the teacher's, its kept channels, scaled by sqrt(d_old / d_new)
    teacher = np.asarray(flat_params(tiny_model)["embedder.embedding"])
    want = teacher[np.asarray(kept["vocab"])][:, np.asarray(kept["channels"])] * np.sqrt(64 / 48)
    np.testing.assert_allclose(np.asarray(flat_params(student)["embedder.embedding"]), want, rtol=1e-6)
    # the student's pieces are the teacher's: its ids map onto the teacher's, in order
    assert tokenizer.ids_in(tiny_tokenizer).tolist() == kept["vocab"]
    assert (out / "prune.png").read_bytes()[:4] == b"\x89PNG"


def test_a_trimmed_tokenizer_round_trips_and_keeps_the_teachers_ids(pruned, tiny_tokenizer):
    out, record = pruned
    _, tokenizer = load_model_dir(out)
    for text in ("plain words and more words", "Привет 你好 🙂 tabs\tand\n\nnewlines", "\x00\x7f bytes"):
        assert tokenizer.decode(tokenizer.encode(text)) == tiny_tokenizer.decode(tiny_tokenizer.encode(text))
    # text made only of kept pieces tokenizes as the teacher does, ids mapped
    keep = np.asarray(record["kept"]["vocab"])
    line = next(line for line in training_text(lines=900)[:800] if set(tiny_tokenizer.encode(line)) <= set(keep))
    assert keep[tokenizer.encode(line)].tolist() == tiny_tokenizer.encode(line)


@pytest.mark.parametrize("settings, message", [
    (dict(layers=5), "--layers 5 is larger than the teacher's 4"),
    (dict(ffn_dim=256), "--ffn-dim 256 is larger"),
    (dict(num_heads=3), "--num-heads 3 does not divide among the teacher's 2 KV groups"),
    (dict(d_model=47), "--d-model must be even"),
    (dict(vocab_size=100), "required"),
    (dict(layers=2, keep_layers=(0, 1)), "give one of the two"),
    (dict(keep_layers=(2, 1)), "increasing"),
    (dict(samples=0), "--samples must be a positive integer"),
])
def test_bad_settings_are_refused_cleanly(tmp_path, tiny_model_dir, corpus, settings, message):
    out = tmp_path / "out" / "student"
    settings = PruneSettings(**{"calibration": (str(corpus / "train.txt"),), "seq_len": 32, "samples": 8, **settings})
    assert_refused_cleanly(lambda: prune(str(tiny_model_dir), out, settings), out, message)


def test_bad_calibration_and_teachers_are_refused_cleanly(tmp_path, tiny_model_dir, tiny_model, tiny_tokenizer):
    out = tmp_path / "out" / "student"
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    for source, message in ((empty, "holds no text"), (binary, "is not text"), (tmp_path / "nope", "no such file")):
        settings = PruneSettings(calibration=(str(source),), vocab_size=VOCAB, samples=8, seq_len=32)
        assert_refused_cleanly(lambda: prune(str(tiny_model_dir), out, settings), out, message)
    scheme = QuantScheme.parse("int4-b32")
    quantized = tmp_path / "q" / "model"
    params = quantize_params(flat_params(tiny_model), scheme.tensor_specs(list(flat_params(tiny_model))))
    save_model_dir(TINY, params, tiny_tokenizer, quantized, quant_info={"scheme": "int4-b32", "method": "rtn"})
    settings = PruneSettings(calibration=("stdlib",), vocab_size=VOCAB)
    assert_refused_cleanly(lambda: prune(str(quantized), out, settings), out, "quantized")
    result = nano("prune", tiny_model_dir, "--out", out, "--keep-layers", "0,x", ok=False)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: --keep-layers")
    assert parse_layers("0,2,4-6") == (0, 2, 4, 5, 6)


def test_explicit_layers_keep_their_kinds(tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "kinds"
    nano("prune", tiny_model_dir, "--out", out, "--keep-layers", "0,1,3", "--calibration", corpus / "train.txt")
    student, _ = load_model_dir(out)
    assert student.config.layer_types == (LOCAL, GLOBAL, GLOBAL) and student.config.layer_kinds is not None


DISTILL = ("--steps", "3", "--batch-size", "2", "--seq-len", "16", "--top-k", "8", "--eval-batches", "1",
           "--lr", "1e-3", "--warmup-steps", "1")


def test_a_trimmed_vocabulary_student_distils_online_cached_and_on_policy(pruned, tmp_path, tiny_model_dir,
                                                                         corpus):
    out, _ = pruned
    data = ("--teacher", tiny_model_dir, "--student", out, "--data", corpus / "train.txt", "--eval-data",
            corpus / "heldout.txt")
    online = tmp_path / "online"
    report = _json(nano("distill", *data, *DISTILL, "--json", "--out", online).output)
    assert report["sparse_target"] == "rest"  # a trimmed vocabulary learns the teacher's rest as one outcome
    final = report["final_eval"]
    assert 0 < final["kl_teacher_student"] < 10 and 0 <= final["teacher_student_top1"] <= 1
    assert final["bits_per_byte"] > 0 and "bits_per_byte" in report["final_eval"]
    student, tokenizer = load_model_dir(online / "final")
    assert tokenizer.vocab_size == VOCAB
    cache = tmp_path / "cache"
    nano("distill", "cache-teacher", *data, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--top-k", "8",
         "--out", cache)
    cached = tmp_path / "cached"
    nano("distill", *data, *DISTILL, "--teacher-cache", cache, "--out", cached)
    a, b = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (online, cached))
    for x, y in zip(a, b, strict=True):
        assert y["kd"] == pytest.approx(x["kd"], rel=1e-5) and y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    # a cache made for the teacher's own vocabulary is refused by the trimmed student's run, with the reason
    other = tmp_path / "other-cache"
    nano("distill", "cache-teacher", "--teacher", tiny_model_dir, "--student", "tiny", "--data", corpus / "train.txt",
         "--eval-data", corpus / "heldout.txt", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--top-k", "8",
         "--out", other)
    refused = nano("distill", *data, *DISTILL, "--teacher-cache", other, "--out", tmp_path / "x", ok=False)
    assert refused.exit_code == 1 and "vocab" in refused.output and not (tmp_path / "x").exists()
    on_policy = tmp_path / "on-policy"
    nano("distill", *data, *DISTILL, "--on-policy-fraction", "1", "--out", on_policy)
    steps = [json.loads(line) for line in (on_policy / "metrics.jsonl").read_text().splitlines()]
    assert all(s["on_policy"] and np.isfinite(s["kd"]) for s in steps)


def _json(output: str) -> dict:
    return json.loads(output[output.index("{\n"):])


def test_the_pruned_students_artifact_computes_what_jax_computes(pruned, tmp_path):
    from export.run import export
    from export.settings import ExportSettings

    out, _ = pruned
    result = export(str(out), tmp_path / "student.litertlm", ExportSettings(prefill_lengths=(4, 16), max_tokens=64))
    verification = result["verification"]
    assert verification["ok"] and verification["max_abs_logit_diff"] <= 1e-3
    assert result["params"] == load_model_dir(out)[0].config.param_count


def test_students_report_puts_the_student_beside_its_teacher(pruned, tmp_path, tiny_model_dir, corpus):
    """`nano report students`: parameters and bits per byte of each float model (equal to `nano perplexity`'s),
    the artifacts' size and speed from one alternating bench run, each against the first row."""
    from bench.run import bench_many
    from export.run import export
    from export.settings import ExportSettings
    from nano.perplexity import perplexity

    out, record = pruned
    small = ExportSettings(prefill_lengths=(4,), max_tokens=64, verify=False)
    for name, model in (("teacher", tiny_model_dir), ("student", out)):
        export(str(model), tmp_path / f"{name}.litertlm", small)
    results = bench_many([tmp_path / "teacher.litertlm", tmp_path / "student.litertlm"], threads=2,
                         prefill_tokens=(4,), decode_tokens=4, repeats=1)
    (tmp_path / "bench.json").write_text(json.dumps(results))
    report = nano("report", "students", f"teacher={tiny_model_dir}", f"student={out}", "--text",
                  corpus / "heldout.txt", "--bench", tmp_path / "bench.json", "--out", tmp_path / "report").output
    rows = json.loads((tmp_path / "report" / "students.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student"] and "| student |" in report
    text = (corpus / "heldout.txt").read_text()
    for row, model in zip(rows, (tiny_model_dir, out)):
        net, tokenizer = load_model_dir(model)
        assert row["bits_per_byte"]["heldout.txt"] == pytest.approx(perplexity(net, tokenizer, text).bits_per_byte,
                                                                   rel=1e-6)
    assert rows[1]["params"] == record["student"]["params"] and rows[1]["params_vs_reference"] < 1
    assert rows[1]["file_bytes"] < rows[0]["file_bytes"] and rows[1]["decode_tokens_per_s"] > 0
    assert rows[1]["decode_vs_reference"] == pytest.approx(rows[1]["decode_tokens_per_s"] /
                                                           rows[0]["decode_tokens_per_s"])
    assert (tmp_path / "report" / "students.png").read_bytes()[:4] == b"\x89PNG"
    # the same list of results, as `nano report bench` reads it: one row per artifact benched together
    table = nano("report", "bench", f"run={tmp_path / 'bench.json'}", "--out", tmp_path / "bench-report")
    bench_rows = json.loads((tmp_path / "bench-report" / "bench.json").read_text())
    assert table.exit_code == 0 and list(bench_rows) == ["run/teacher", "run/student"]
