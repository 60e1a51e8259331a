"""The `nano` command line: results checked against the library computed independently here, and bad input.

Most commands run in-process through click's CliRunner (no interpreter and JAX start-up per call); the exit status
and the exact stderr shape of real processes are checked by running the installed `nano` script.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner, Result
from flax import nnx

from hf_tiny import training_text
from nano.checkpoint import TOKENIZER_FILE
from cli.main import cli
from nano.config import NANO_1, NANO_2, TINY
from nano.tokenizer import Tokenizer

BIN = Path(sys.executable).parent
NANO = BIN / "nano"
GOLDEN = Path(__file__).resolve().parent / "golden"


def invoke(*args) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, f"nano {' '.join(map(str, args))}: {result.output}"
    return result


def run_nano(*args, script: Path = NANO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# --- info ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, config, expected", [("nano-1", NANO_1, 1.80e9), ("nano-2", NANO_2, 3.25e9)])
def test_info_presets_json(preset, config, expected):
    info = json.loads(invoke("info", preset, "--json").stdout)
    assert abs(info["params"] / expected - 1) <= 0.01, info["params"]
    assert info["params"] == config.param_count  # eval_shape's count equals the closed form
    assert {k: info[k] for k in config.to_dict()} == config.to_dict()
    assert info["layer_types"] == list(config.layer_types) and info["config_hash"] == config.hash


def test_info_table():
    out = invoke("info", "tiny").stdout
    assert out.splitlines()[0].strip() == f"tiny: {TINY.param_count / 1e6:.3f}M parameters"
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["params"] == f"{TINY.param_count:,}" == "181,440"
    assert rows["vocab_size"] == "512" and rows["global_every"] == "2" and rows["config_hash"] == TINY.hash


def test_info_model_dir(tiny_model_dir):
    info = json.loads(invoke("info", tiny_model_dir, "--json").stdout)
    assert {k: info[k] for k in TINY.to_dict()} == TINY.to_dict()
    assert info["params"] == TINY.param_count


# --- tokenize ------------------------------------------------------------------------------------------------

def test_tokenize_json(tiny_model_dir, tiny_tokenizer, tmp_path):
    text = "\n".join(training_text(seed=3, lines=5)) + "\n  two  spaces, ünïcode 東京\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = invoke("tokenize", tiny_model_dir, "--file", tmp_path / "t.txt", "--json").stdout
    assert out.count("\n") == 1  # one JSON list on one line
    ids = json.loads(out)
    assert ids == tiny_tokenizer.encode(text) and ids[0] != tiny_tokenizer.bos_id


def test_tokenize_table(tiny_model_dir, tiny_tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text("Kalo mine", encoding="utf-8")
    lines = invoke("tokenize", tiny_model_dir, "--file", tmp_path / "t.txt").stdout.splitlines()
    ids = tiny_tokenizer.encode("Kalo mine")
    assert lines == [f"{i}\t{tiny_tokenizer.id_to_piece(i)!r}" for i in ids]


def test_tokenize_teacher(teacher_dir):
    """`gemma3-270m` resolves to the cached import; its ids equal the tokenizer's and llama.cpp's."""
    name = "multilingual.txt"
    out = invoke("tokenize", "gemma3-270m", "--file", GOLDEN / name, "--json").stdout
    text = (GOLDEN / name).read_bytes().decode("utf-8")
    assert json.loads(out) == Tokenizer.load(teacher_dir / TOKENIZER_FILE).encode(text)
    assert json.loads(out) == json.loads((GOLDEN / "llamacpp_tokens.json").read_text())[name]


@nnx.jit
def _logits(model, tokens):
    return model(tokens)[0]


def full_sequence_logits(model, seqs: list[list[int]], length: int) -> np.ndarray:
    """Logits [len(seqs), length, vocab] of the model run on whole sequences, padded at the end to one compiled
    shape (the decoder is causal, so padding after a position does not change it)."""
    tokens = np.zeros((len(seqs), length), np.int32)
    for row, seq in zip(tokens, seqs):
        row[:len(seq)] = seq
    return np.asarray(_logits(model, jnp.asarray(tokens)), np.float64)


# --- perplexity ----------------------------------------------------------------------------------------------

WINDOW = 16


@pytest.fixture(scope="module")
def ppl_text(tiny_tokenizer, tmp_path_factory):
    text = "\n".join(training_text(seed=7, lines=7)) + "\n"
    n = len(tiny_tokenizer.encode(text))
    assert n > 3 * WINDOW and n % (WINDOW - 1), n  # more than three windows, the last one partial
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def reference_perplexity(model, tokenizer, text: str, window: int) -> tuple[float, int]:
    """The protocol, spelled out: no-BOS ids in chunks of window - 1, BOS before each, every text token scored."""
    ids = tokenizer.encode(text)
    seqs = [[tokenizer.bos_id] + ids[start:start + window - 1] for start in range(0, len(ids), window - 1)]
    nll = []
    for seq, logits in zip(seqs, full_sequence_logits(model, seqs, window)):
        top = logits.max(-1, keepdims=True)
        logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
        nll += [-logp[t, seq[t + 1]] for t in range(len(seq) - 1)]
    return math.exp(float(np.mean(nll))), len(nll)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_json(batch_size, tiny_model_dir, tiny_model, tiny_tokenizer, ppl_text):
    out = invoke("perplexity", tiny_model_dir, "--text", ppl_text, "--window", WINDOW, "--batch-size", batch_size,
                 "--json").stdout
    result = json.loads(out)
    assert set(result) == {"ppl", "tokens", "bits_per_byte", "bytes", "as_device"} and result["as_device"] is False
    text = ppl_text.read_text(encoding="utf-8")
    ppl, tokens = reference_perplexity(tiny_model, tiny_tokenizer, text, WINDOW)
    assert result["tokens"] == tokens == len(tiny_tokenizer.encode(text))
    assert result["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert 1 < result["ppl"] < 10 * TINY.vocab_size
    # bits per byte: the same total NLL over ln 2 × the text's UTF-8 bytes
    assert result["bytes"] == len(text.encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(math.log(ppl) * tokens / (math.log(2) * result["bytes"]), rel=1e-5)


def test_perplexity_text_output(tiny_model_dir, ppl_text):
    out = invoke("perplexity", tiny_model_dir, "--text", ppl_text, "--window", WINDOW).stdout
    assert out.startswith("perplexity ") and f"window {WINDOW}" in out and out.count("\n") == 1


# --- generate ------------------------------------------------------------------------------------------------

PROMPT = "Kalo mine the"


def test_generate_greedy(tiny_model_dir, tiny_model, tiny_tokenizer):
    """Greedy decoding with the KV cache equals argmax over the full sequence re-run at every step."""
    ids = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(PROMPT)
    new = []
    for _ in range(8):
        logits = full_sequence_logits(tiny_model, [ids + new], 32)[0, len(ids) + len(new) - 1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "a near tie: pick another prompt for a stable comparison"
        token = int(logits.argmax())
        if token in tiny_tokenizer.stop_ids:
            break
        new.append(token)
    out = invoke("generate", tiny_model_dir, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 8).stdout
    assert out == tiny_tokenizer.decode(new) + "\n"
    assert len(new) == 8  # no early stop, so all eight steps were compared


@pytest.mark.slow
def test_generate_seeds(tiny_model_dir):
    def sample(seed):
        return invoke("generate", tiny_model_dir, "--prompt", PROMPT, "--temperature", 1.0, "--max-new-tokens", 8,
                      "--seed", seed).stdout

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first  # 8 tokens from a near-flat distribution over 512: a collision is negligible


@pytest.mark.slow
def test_generate_teacher(teacher_dir):  # the fixture imports it once if the cache lacks it
    """The embedded teacher, greedy, in a real process. Gemma 3 270M continues "The capital of France is" with
    " the capital of the country of France.", so the prompt gives it a pattern; the first five tokens win by a
    margin of at least 1.5 logits, so the check is stable."""
    proc = run_nano("generate", "gemma3-270m", "--prompt", "The capital of Germany is Berlin. The capital of France is",
                    "--temperature", 0, "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris. The capital of"), proc.stdout
    assert "tokens, first after" in proc.stderr  # the statistics go to stderr, the text alone to stdout


# --- Bad input, in real processes ----------------------------------------------------------------------------

def _truncated_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] * 64)
    w.add_tensor("token_embd.weight", np.ones((256, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _bad_cases(tmp: Path, model_dir: Path) -> dict[str, list]:
    text = tmp / "text.txt"
    text.write_text("Kalo mine the ruthe.\n")
    empty = tmp / "empty.txt"
    empty.write_text(" \n\n")
    (tmp / "not-a-model").mkdir()
    return {
        "missing text file": ["perplexity", model_dir, "--text", tmp / "missing.txt"],
        "empty text file": ["perplexity", model_dir, "--text", empty],
        "not a model dir": ["perplexity", tmp / "not-a-model", "--text", text],
        "unknown preset": ["info", "nano-9"],
        "preset without weights": ["perplexity", "nano-1", "--text", text],
        "truncated gguf": ["import-gguf", _truncated_gguf(tmp / "cut.gguf"), "--out", tmp / "out" / "model"],
        "negative temperature": ["generate", model_dir, "--prompt", "Kalo", "--temperature", -1],
        "top-p above 1": ["generate", model_dir, "--prompt", "Kalo", "--top-p", 1.5],
    }


BAD_MESSAGES = {
    "missing text file": "does not exist",
    "empty text file": "is empty",
    "not a model dir": "is not a model directory",
    "unknown preset": "neither a model directory nor a preset",
    "preset without weights": "without weights",
    "truncated gguf": "not a readable GGUF",
    "negative temperature": "temperature",
    "top-p above 1": "top-p",
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_model_dir):
    """Every bad-input command at once (their start-up is most of the time, and independent)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(tmp, tiny_model_dir)
    procs = {case: subprocess.Popen([str(NANO), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for case, args in cases.items()}
    results = {case: (p.communicate(timeout=300), p.returncode) for case, p in procs.items()}
    return tmp, results


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_input(case, bad_runs):
    tmp, results = bad_runs
    (stdout, stderr), code = results[case]
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and stderr.count("\n") == 1, stderr  # one line: no traceback, no status output
    assert lines[0].startswith("Error: ") and BAD_MESSAGES[case] in lines[0], lines[0]
    assert stdout == ""
    if case == "truncated gguf":
        assert not (tmp / "out" / "model").exists()
        assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())
