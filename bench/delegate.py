"""An exported artifact through a LiteRT external delegate given by path (Coral's libedgetpu.so.1, a GPU delegate,
a vendor's NPU library): the runner `nano bench --delegate PATH` times.

It is export.runtime.TFLiteRunner's engine-like prefill and decode on ai-edge-litert's classic Interpreter, the API
that loads external delegates. That Interpreter cannot bind one buffer as both input and output, so every call
copies the KV caches in and out; on the CPU that costs decode speed (TFLiteRunner avoids it), which is the price of
reaching a delegate from Python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.io_names import DECODE, INPUT_POS, LOGITS, MASK, TOKENS
from export.runtime import TFLiteRunner, engine_mask
from nano.errors import NanoError


def load_delegate(library: str, options: dict[str, str] | None = None):
    """The delegate, or one clear line on why it cannot be loaded. The library is opened with ctypes first:
    ai-edge-litert's load_delegate turns only a failed create into a clean error (a missing file, a non-ELF file or
    a library without the delegate entry point escape as OSError/AttributeError and a noisy __del__)."""
    import ctypes

    from ai_edge_litert.interpreter import load_delegate as load

    if "/" in library and not Path(library).is_file():
        raise NanoError(f"delegate library {library} not found (install the vendor's runtime, e.g. libedgetpu1-std "
                        "for a Coral Edge TPU, and pass the path of its .so)")
    target = str(Path(library).resolve()) if Path(library).is_file() else library  # dlopen skips the cwd
    try:
        handle = ctypes.CDLL(target)
    except OSError as e:
        raise NanoError(f"cannot load {library} as a LiteRT external delegate: {e}") from None
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        raise NanoError(f"{library} is not a LiteRT external delegate (it has no tflite_plugin_create_delegate)")
    try:
        return load(target, options or {})
    except ValueError as e:  # the library's create refused: for an Edge TPU, typically no device attached
        reason = str(e).partition("\n")[2].strip() or "no reason given; is the device attached?"
        raise NanoError(f"delegate {library} refused to start: {reason}") from None


def delegated_nodes(interpreter) -> dict:
    """How many of the first signature's operations the delegate took (the Python API sees subgraph 0 only).
    Each delegated partition is appended as a DELEGATE node whose inputs and outputs are the partition's boundary;
    the original nodes it replaced are those between them, found by walking back from its outputs."""
    ops = interpreter._get_ops_details()
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    original = partitions[0]["index"] if partitions else len(ops)
    producer = {int(t): op["index"] for op in ops[:original] for t in op["outputs"]}
    taken = set()
    for partition in partitions:
        boundary, todo = {int(t) for t in partition["inputs"]}, [int(t) for t in partition["outputs"]]
        while todo:
            tensor = todo.pop()
            if tensor in boundary or tensor not in producer or producer[tensor] in taken:
                continue
            taken.add(producer[tensor])
            todo.extend(int(t) for t in ops[producer[tensor]]["inputs"] if t >= 0)
    return {"nodes": original, "delegated_nodes": len(taken), "delegate_partitions": len(partitions)}


class DelegatedRunner(TFLiteRunner):
    def __init__(self, path: str | Path, *, delegate: str, options: dict[str, str] | None = None,
                 threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        loaded = load_delegate(delegate, options)
        try:
            self.interpreter = Interpreter(model_path=str(path), experimental_delegates=[loaded],
                                           num_threads=threads)
        except (ValueError, RuntimeError) as e:
            raise NanoError(f"delegate {delegate} failed on {Path(path).name}: {' '.join(str(e).split())}") from None
        self.placement = delegated_nodes(self.interpreter)  # before allocation, when XNNPACK takes the CPU's share
        if self.placement["delegated_nodes"] == 0:
            raise NanoError(f"{delegate} took none of the {self.placement['nodes']} operations of "
                            f"{Path(path).name}: the model cannot run there (an Edge TPU, for one, runs only fully "
                            "int8 models compiled by edgetpu_compiler)")
        self._runners = {sig: self.interpreter.get_signature_runner(sig)
                         for sig in self.interpreter.get_signature_list()}
        self._read_layout(path, self._runners, lambda: (self._runners[DECODE].get_input_details(),
                                                        self._runners[DECODE].get_output_details()))
        self.cache = {n: np.zeros(shape, self.cache_dtypes[n]) for n, shape in self.cache_shapes.items()}

    def _run(self, signature: str, tokens: np.ndarray, positions: np.ndarray, outputs: dict) -> dict:
        inputs = {TOKENS: np.asarray(tokens, np.int32).reshape(1, -1), INPUT_POS: np.asarray(positions, np.int32)}
        if MASK in self._runners[signature].get_input_details():
            inputs[MASK] = engine_mask(positions, self.max_tokens)
        out = self._runners[signature](**inputs, **self.cache)
        self.cache = {n: out[n] for n in self.cache}
        return out

    def decode(self, token: int, position: int) -> np.ndarray:
        out = self._run(DECODE, np.array([token]), np.array([position]), {})
        return out[LOGITS].reshape(-1).astype(np.float32)
