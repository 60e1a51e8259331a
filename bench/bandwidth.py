"""The physical limit of decode: every decoded token reads all the weights and the whole KV cache once (the
exported attention runs over every cache slot), so decode can go no faster than memory bandwidth / those bytes.
"""

from __future__ import annotations

import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from export.io_names import DECODE, K_CACHE, MASK, V_CACHE


_ITEM_BYTES = {0: 4, 1: 2, 9: 1}  # TFLite's FLOAT32, FLOAT16 and INT8 tensor types


def decode_bytes(tflite: Path, *, context: int | None = None) -> dict:
    """Bytes one decode step reads: the constant buffers of the decode signature (each shared buffer once) and its
    KV-cache inputs, the global layers' at `context` slots when the engine chooses it at load (the file holds
    them at the context placeholder, the `mask` input's last dimension)."""
    from ai_edge_litert import schema_py_generated as schema

    with open(tflite, "rb") as f:  # the map outlives the flatbuffer views into it; it closes when they are gone
        model = schema.Model.GetRootAs(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), 0)
        signature = next(model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
                         if model.SignatureDefs(i).SignatureKey().decode() == DECODE)
        graph = model.Subgraphs(signature.SubgraphIndex())
        buffers = {}
        for i in range(graph.TensorsLength()):
            index = graph.Tensors(i).Buffer()
            buffer = model.Buffers(index) if index else None
            if buffer is not None:  # a buffer past the 2 GB limit keeps its bytes at (offset, size) in the file
                buffers[index] = buffer.DataLength() or buffer.Size()
        inputs = {signature.Inputs(i).Name().decode(): graph.Tensors(signature.Inputs(i).TensorIndex())
                  for i in range(signature.InputsLength())}
        placeholder = int(inputs[MASK].ShapeAsNumpy()[-1]) if MASK in inputs else None
        cache = 0
        for name, tensor in inputs.items():
            if name.startswith((K_CACHE, V_CACHE)):
                shape = tensor.ShapeAsNumpy().tolist()
                if context is not None:  # the engine rewrites the placeholder wherever it is (values: the last axis)
                    shape = [context if d == placeholder else d for d in shape]
                cache += int(np.prod(shape)) * _ITEM_BYTES[tensor.Type()]
    return {"weight_bytes": sum(buffers.values()), "kv_cache_bytes": cache}


def memory_bandwidth(threads: int, *, size: int = 512 * 2**20, repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: `threads` threads each take the max of their share of a `size`-byte array
    (numpy releases the GIL and reads with SIMD); the best of `repeats`, as the decoder's best case."""
    array = np.ones(size // 4, np.float32)
    parts = np.array_split(array, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, array.nbytes / (time.perf_counter() - start))
    return best


def decode_limit(tflite: Path, decode_tokens_per_s: float, threads: int, *, context: int | None = None) -> dict:
    """Bytes per decoded token, the bandwidth the measured decode rate implies, the machine's bandwidth, and the
    decode rate that bandwidth would allow (at `context`, for an artifact whose context is chosen at load)."""
    read = decode_bytes(tflite, context=context)
    per_token = read["weight_bytes"] + read["kv_cache_bytes"]
    bandwidth = memory_bandwidth(threads)
    return {**read, "decode_bytes_per_token": per_token,
            "decode_bandwidth_bytes_per_s": per_token * decode_tokens_per_s,
            "memory_bandwidth_bytes_per_s": bandwidth,
            "decode_bandwidth_fraction": per_token * decode_tokens_per_s / bandwidth,
            "decode_tokens_per_s_limit": bandwidth / per_token}
