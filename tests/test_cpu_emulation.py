"""`nano-export --verify-cpu`: the artifact verified as CPUs of other kinds run it, under qemu-x86_64 -cpu (the real
ai-edge-litert and XNNPACK in a child whose CPUID is the emulated model's). .ci/run installs Debian's qemu-user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checks import assert_refused_cleanly
from export.run import export
from export.settings import ExportSettings
from export.verify import failure_line
from nano.config import TINY

CONTEXT = 64
SMALL = dict(prefill_lengths=(4, 16), max_tokens=CONTEXT)
NANO_EXPORT = Path(sys.executable).parent / "nano-export"
needs_qemu = pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-x86_64 (Debian: qemu-user)")


@needs_qemu
@pytest.mark.slow
def test_emulated_avx2_cpu_runs_the_float_artifact_as_this_one_does(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Prefill (two signatures and a padded chunk) and decode to the end of the context through the child: a float
    artifact's logits equal this CPU's up to the order of float additions, so the stream of requests and logits
    is exact; and the child's CPUID is the emulated model's (AVX2, no AVX-512), whatever this CPU has."""
    from export.cpu_emulation import EmulatedRunner
    from export.runtime import TFLiteRunner
    from export.verify import verification_window

    artifact = export(str(tiny_model_dir), tmp_path / "tiny.tflite", ExportSettings(**SMALL))["out"]
    window = verification_window(tiny_tokenizer, CONTEXT, TINY.vocab_size)[0]
    here, avx2 = TFLiteRunner(artifact, threads=2), EmulatedRunner(artifact, "avx2")
    assert "AVX2" in avx2.features and "FMA3" in avx2.features and "AVX512F" not in avx2.features
    layout = [(r.prefill_lengths, r.max_tokens, r.vocab_size) for r in (here, avx2)]
    assert layout[0] == layout[1] and layout[0][0] == [4, 16]
    logits = {}
    for name, runner in (("here", here), ("avx2", avx2)):
        runner.prefill(window[:23])
        logits[name] = np.stack([runner.decode(int(window[p]), p) for p in range(23, CONTEXT - 1)])
    avx2.close()
    assert np.abs(logits["avx2"] - logits["here"]).max() <= 1e-4
    assert np.abs(logits["here"]).max() > 1e-2  # real logits, not zeros on both sides


@needs_qemu
@pytest.mark.slow
def test_int4_export_verifies_as_an_avx2_and_an_avx_cpu(tiny_model_dir, tmp_path, capsys):
    """One export, verified here and as two emulated CPUs against the same device model: each within the
    tolerance, each CPU the kind asked for, and the table says so."""
    out = tmp_path / "tiny.tflite"
    proc = subprocess.run([str(NANO_EXPORT), str(tiny_model_dir), "--quant", "int4-b32", "--prefill-lengths", "4,16",
                           "--max-tokens", str(CONTEXT), "--verify-cpu", "avx2", "--verify-cpu", "avx", "--out",
                           str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    verification = result["verification"]
    assert verification["ok"] and out.exists() and list(verification["cpus"]) == ["avx2", "avx"]
    avx2, avx = verification["cpus"]["avx2"], verification["cpus"]["avx"]
    assert "AVX2" in avx2["features"] and "AVX512F" not in avx2["features"]
    assert "AVX" in avx["features"] and "AVX2" not in avx["features"]
    for figures in (avx2, avx):
        assert figures["ok"] and abs(figures["ppl_ratio"] - 1) <= verification["tolerance"]
        assert figures["ppl_artifact"] == pytest.approx(verification["ppl_device"] * figures["ppl_ratio"])
        assert figures["top1_agreement"] > 0.5  # int8 rounding noise moves some argmaxes, not most
    from cli.export import _print_table

    _print_table(result)
    table = capsys.readouterr().out
    assert "verified as avx2" in table and "up to AVX2" in table and "up to AVX)" in table


@needs_qemu
def test_verify_cpu_refusals_come_before_the_conversion(tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "m.tflite"
    assert_refused_cleanly(lambda: export(str(tiny_model_dir), out, ExportSettings(verify_cpus=("pentium9",),
                                                                                   **SMALL)),
                           out, r"--verify-cpu 'pentium9': neither avx2, avx nor a CPU model of qemu-x86_64")
    assert_refused_cleanly(lambda: export(str(tiny_model_dir), out, ExportSettings(verify_cpus=("avx2",),
                                                                                   verify=False, **SMALL)),
                           out, "cannot go with --no-verify")


@needs_qemu
def test_a_child_that_cannot_load_the_artifact_says_why_in_one_line(tmp_path):
    from export.cpu_emulation import EmulatedRunner
    from nano.errors import NanoError

    with pytest.raises(NanoError, match=r"^the artifact stopped under qemu-x86_64 -cpu EPYC-Rome: RuntimeError: "
                                        r"Failed to load model") as e:
        EmulatedRunner(tmp_path / "missing.tflite", "avx2")
    assert "\n" not in str(e.value)


def test_verify_cpu_without_qemu_is_one_line(tiny_model_dir, tmp_path):
    """With no qemu-x86_64 on PATH: one line that says what to install, exit 1, nothing written."""
    out = tmp_path / "m.tflite"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's commands, not /usr/bin
    proc = subprocess.run([str(NANO_EXPORT), str(tiny_model_dir), "--out", str(out), "--verify-cpu", "avx2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stdout == "" and not out.exists()
    assert proc.stderr.strip().splitlines() == ["Error: --verify-cpu needs qemu-x86_64 (Debian/Ubuntu: apt-get "
                                                "install qemu-user)"]


def test_failure_line_names_the_cpu_that_failed():
    """This CPU's comparison is reported first; when it passed, the first emulated CPU that did not."""
    def figures(ppl, ok):
        return {"ppl_artifact": ppl, "max_abs_logit_diff": 0.5, "ppl_ratio": ppl / 10.0, "ok": ok}

    result = {**figures(10.1, True), "criterion": "perplexity within 2.0% of the device model's", "tolerance": 0.02,
              "ppl_device": 10.0, "ppl_jax": 9.8, "ok": False, "ok_here": True,
              "cpus": {"avx2": figures(10.15, True), "avx": figures(10.5, False)}}
    line = failure_line(result)
    assert line.startswith("verification failed on the emulated avx CPU: perplexity through the artifact 10.5000")
    assert "+5.00%, limit ±2%" in line
    result.update(figures(10.3, False), ok_here=False)
    assert failure_line(result).startswith("verification failed: perplexity through the artifact 10.3000")
