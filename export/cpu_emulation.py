"""Run an artifact as a CPU of another kind runs it, to verify it for the CPUs it ships to and not only this one.

XNNPACK picks its kernels from CPUID when it loads a model: AVX512-VNNI, AVX2 and AVX each have their own int8 ×
int4 kernels, which add in their own order (and the VNNI ones shift the codes to unsigned), so an integer artifact
verified here is verified for this CPU's family only (issue 21: RTN int4 passed on AVX-512 and failed on AVX2).
Under `qemu-x86_64 -cpu MODEL` (user-mode emulation, Debian's qemu-user) the same Python and ai-edge-litert run in a
child process that sees that model's CPUID, so XNNPACK takes that family's kernels; TCG computes each instruction's
exact result, so the logits are that CPU's, only ~100× slower (for verification, never for timing). The child
runs export.runtime.TFLiteRunner and streams each decoded token's logits back over a pipe.

TCG emulates no AVX-512 at all: the AVX-512 families are the ones to verify on a real CPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from nano.errors import NanoError

# Short names for the x86 families an artifact meets besides AVX-512, as qemu CPU models (any other model qemu
# knows, `qemu-x86_64 -cpu help`, works as well).
CPUS = {"avx2": "EPYC-Rome",  # AMD Zen 2: AVX2 + FMA, no AVX-512, no VNNI (the CPU of issue 21)
        "avx": "SandyBridge"}  # Intel Sandy Bridge: AVX, no AVX2 or FMA (NumPy's x86-64-v2 floor is older still)
_PREFILL, _DECODE = 0, 1
_ROOT = Path(__file__).resolve().parents[1]


def qemu() -> str:
    """The qemu-x86_64 binary, or why it cannot be used here."""
    if platform.machine() != "x86_64":
        raise NanoError(f"--verify-cpu emulates x86-64 CPUs with qemu-x86_64 on an x86-64 machine; this is "
                        f"{platform.machine()}")
    found = shutil.which("qemu-x86_64")
    if found is None:
        raise NanoError("--verify-cpu needs qemu-x86_64 (Debian/Ubuntu: apt-get install qemu-user)")
    return found


def cpu_model(cpu: str) -> str:
    """The qemu CPU model of `cpu` (a name in CPUS, or a model itself), checked against the ones qemu knows."""
    model = CPUS.get(cpu, cpu)
    listing = subprocess.run([qemu(), "-cpu", "help"], capture_output=True, text=True).stdout
    known = {fields[1] for fields in map(str.split, listing.splitlines()) if len(fields) > 1 and fields[0] == "x86"}
    if model not in known:
        raise NanoError(f"--verify-cpu {cpu!r}: neither {', '.join(CPUS)} nor a CPU model of qemu-x86_64 "
                        f"(`qemu-x86_64 -cpu help` lists them)")
    return model


class EmulatedRunner:
    """export.runtime.TFLiteRunner's prefill and decode, run by a child under qemu-x86_64 -cpu `cpu` (a name in
    CPUS or a qemu CPU model). `features` are the instruction sets the child's NumPy found in its CPUID."""

    def __init__(self, path: str | Path, cpu: str, *, threads: int | None = None):
        self.cpu, self.model = cpu, cpu_model(cpu)
        self._log = tempfile.TemporaryFile()  # qemu warns of every CPUID bit TCG lacks; kept for an error line
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        self._child = subprocess.Popen(
            [qemu(), "-cpu", self.model, sys.executable, "-m", "export.cpu_emulation", str(path),
             str(threads or os.cpu_count() or 1)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        header = json.loads(self._read(int.from_bytes(self._read(4), "little")))
        self.max_tokens, self.vocab_size = header["max_tokens"], header["vocab_size"]
        self.prefill_lengths, self.features = header["prefill_lengths"], header["features"]

    def _read(self, size: int) -> bytes:
        data = self._child.stdout.read(size)
        if len(data) < size:
            raise self._stopped()
        return data

    def _stopped(self) -> NanoError:
        """The child is gone: its last line that is not one of qemu's CPUID warnings says why."""
        code = self._child.wait()
        self._log.seek(0)
        lines = [line for line in self._log.read().decode(errors="replace").splitlines()
                 if line.strip() and "TCG doesn't support requested feature" not in line]
        why = lines[-1].strip() if lines else f"exit status {code}"
        return NanoError(f"the artifact stopped under qemu-x86_64 -cpu {self.model}: {why}")

    def _send(self, op: int, tokens, start: int) -> None:
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        try:
            self._child.stdin.write(np.array([op, tokens.size, start], np.int32).tobytes() + tokens.tobytes())
            self._child.stdin.flush()
        except BrokenPipeError:
            raise self._stopped() from None

    def prefill(self, tokens, start: int = 0) -> None:
        self._send(_PREFILL, list(tokens), start)
        self._read(4)

    def decode(self, token: int, position: int) -> np.ndarray:
        self._send(_DECODE, [token], position)
        return np.frombuffer(self._read(4 * self.vocab_size), np.float32)

    def close(self) -> None:
        child = getattr(self, "_child", None)  # None when __init__ stopped before starting it
        if child is not None and child.poll() is None:
            child.stdin.close()
            child.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def __del__(self):
        self.close()


def _child(path: str, threads: int) -> None:
    """The emulated side: header, then one reply per request until stdin closes."""
    from numpy._core._multiarray_umath import __cpu_features__

    from export.runtime import TFLiteRunner, quiet_native_stderr

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever native code prints must not land in the stream of logits
    requests = sys.stdin.buffer
    with quiet_native_stderr():
        runner = TFLiteRunner(path, threads=threads)
    header = json.dumps({"max_tokens": runner.max_tokens, "vocab_size": runner.vocab_size,
                         "prefill_lengths": runner.prefill_lengths,
                         "features": [name for name, on in __cpu_features__.items() if on]}).encode()
    out.write(len(header).to_bytes(4, "little") + header)
    out.flush()
    while len(head := requests.read(12)) == 12:
        op, count, start = np.frombuffer(head, np.int32)
        tokens = np.frombuffer(requests.read(4 * int(count)), np.int32)
        if op == _DECODE:
            out.write(runner.decode(int(tokens[0]), int(start)).tobytes())  # float32 [vocab]
        else:
            runner.prefill(tokens.tolist(), int(start))
            out.write(bytes(4))
        out.flush()


if __name__ == "__main__":
    try:
        _child(sys.argv[1], int(sys.argv[2]))
    except Exception as error:  # one line for the parent's error, then out before LiteRT's teardown logs bury it
        print(f"{type(error).__name__}: {error}".splitlines()[0], file=sys.stderr, flush=True)
        os._exit(1)
