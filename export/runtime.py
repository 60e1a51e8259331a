"""Run an exported .tflite the way the LiteRT-LM engine does, from Python: ai-edge-litert's CompiledModel on the
CPU (XNNPACK), one set of KV-cache buffers bound as both input and output of every signature (updated in place,
never copied), prompts split into prefill chunks with a padded last chunk (padding at position 0, as the engine
pads). The export verifies artifacts with it; `nano bench` times them with it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from export.io_names import DECODE, INPUT_POS, K_CACHE, LOGITS, MASK, TOKENS, V_CACHE


@contextlib.contextmanager
def quiet_native_stderr():
    """LiteRT's native code logs on stderr every accelerator it looks for, makes and tears down (NPU, OpenVINO, GPU),
    as it loads a model, first runs it and frees it: noise on a CPU. Failures still raise, with their message."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quiet_native_teardown() -> None:
    """LiteRT's native destructors log every accelerator they tear down on stderr when the process exits, after
    Python's exit handlers and so after everything worth reading (errors included) has been printed: from then on,
    stderr is closed to them. Called by the commands that load LiteRT."""
    import atexit

    def silence():
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    atexit.register(silence)


BLOCKED = -0.7 * float(np.finfo(np.float32).max)  # what LiteRT-LM writes where a row may not look


def engine_mask(positions: np.ndarray, slots: int) -> np.ndarray:
    """The `mask` input [1, 1, T, slots] as the LiteRT-LM engine fills it (its InitializeAttentionMask and
    FillAttentionMask): 0 on the slots 0..p a row at position p may see, BLOCKED on the rest."""
    seen = np.arange(slots)[None, :] <= np.asarray(positions)[:, None]
    return np.where(seen, 0.0, BLOCKED).astype(np.float32)[None, None]


class TFLiteRunner:
    def __init__(self, path: str | Path, *, threads: int | None = None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=threads or os.cpu_count() or 1))
        with quiet_native_stderr():
            self.model = CompiledModel.from_file(str(path), options=options)
        signatures = self.model.get_signature_list()
        self._read_layout(path, signatures, lambda: (self.model.get_input_tensor_details(DECODE),
                                                     self.model.get_output_tensor_details(DECODE)))
        self.cache = {n: self.model.create_input_buffer_by_name(DECODE, n) for n in self.cache_shapes}
        for name, buffer in self.cache.items():  # masked slots are multiplied by 0: they must not hold NaN
            buffer.write(np.zeros(self.cache_shapes[name], self.cache_dtypes[name]))
        names = {sig: self.model.get_input_tensor_details(sig) for sig in signatures}
        self._io = {sig: {name: self.model.create_input_buffer_by_name(sig, name)
                          for name in (TOKENS, INPUT_POS, MASK) if name in names[sig]} for sig in signatures}
        self._logits = self.model.create_output_buffer_by_name(DECODE, LOGITS)

    def _read_layout(self, path, signatures, decode_details) -> None:
        """Prefill lengths, cache shapes, context and vocabulary, from the signature names and decode_details(),
        decode's (input, output) details (name → {"shape": ...}, as either LiteRT API gives them)."""
        if DECODE not in signatures:
            raise ValueError(f"{path} has no '{DECODE}' signature (it has {sorted(signatures)})")
        decode_inputs, decode_outputs = decode_details()
        self.prefill_lengths = sorted(int(n.split("_", 1)[1]) for n in signatures if n.startswith("prefill_"))
        self.cache_shapes = {n: tuple(d["shape"]) for n, d in decode_inputs.items()
                             if n.startswith((K_CACHE, V_CACHE))}
        self.cache_dtypes = {n: np.dtype(decode_inputs[n].get("dtype", "float32")) for n in self.cache_shapes}
        # Keys are [.., slots, head_dim] in every layout nano has exported (values are now stored transposed,
        # nano.kv_cache.KVCache); with a mask, the longest is the context placeholder.
        self.max_tokens = max(s[-2] for n, s in self.cache_shapes.items() if n.startswith(K_CACHE))
        self.context_at_load = MASK in decode_inputs  # the engine may run it at any context below that
        self.vocab_size = int(decode_outputs[LOGITS]["shape"][-1])

    def _run(self, signature: str, tokens: np.ndarray, positions: np.ndarray, outputs: dict) -> None:
        io = self._io[signature]
        io[TOKENS].write(np.asarray(tokens, np.int32).reshape(1, -1))
        io[INPUT_POS].write(np.asarray(positions, np.int32))
        if MASK in io:
            io[MASK].write(engine_mask(positions, self.max_tokens))
        self.model.run_by_name(signature, {**io, **self.cache}, {**outputs, **self.cache})

    def prefill(self, tokens, start: int = 0) -> None:
        """Write `tokens` at positions start.. into the cache: the longest prefill signatures that fit, and the
        shortest one padded for the rest."""
        tokens = list(tokens)
        if not self.prefill_lengths:
            for i, token in enumerate(tokens):
                self.decode(token, start + i)
            return
        while tokens:
            fits = [n for n in self.prefill_lengths if n <= len(tokens)]
            n = fits[-1] if fits else self.prefill_lengths[0]
            chunk, tokens = tokens[:n], tokens[n:]
            ids, pos = np.zeros(n, np.int32), np.zeros(n, np.int32)
            ids[:len(chunk)], pos[:len(chunk)] = chunk, np.arange(start, start + len(chunk))
            self._run(f"prefill_{n}", ids, pos, {})
            start += len(chunk)

    def decode(self, token: int, position: int) -> np.ndarray:
        """Feed one token at `position`; the next token's logits [vocab] (float32)."""
        self._run(DECODE, np.array([token]), np.array([position]), {LOGITS: self._logits})
        return self._logits.read(self.vocab_size, np.float32)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """The engine's greedy loop: prefill all but the prompt's last token, then decode from it."""
        self.prefill(prompt[:-1])
        token, out = prompt[-1], []
        for i in range(steps):
            token = int(np.argmax(self.decode(token, len(prompt) - 1 + i)))
            out.append(token)
        return out
