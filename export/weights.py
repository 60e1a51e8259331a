"""Integer and float16 weights in the .tflite: the codes and scales `nano quantize` chose, written unchanged.

The converter sees each quantized weight dequantized (codes × scales, float32). ai-edge-quantizer then rewrites
the flatbuffer the way LiteRT's kernels want it (a FULLY_CONNECTED weight [out, in] as INT4 with blockwise FLOAT16
scales, or INT8 per channel; the EMBEDDING_LOOKUP table alike; one tensor shared by the lookup and the tied head),
with activations quantized at run time ("dynamic" quantization, XNNPACK's int8 × int4 kernels). Its own algorithms
would choose new codes; instead its "dequantized weight recovery" entry is pointed at a function that looks each
float weight up (by content) among ours and returns our codes and scales exactly. `read_back` parses the written
file so the export can prove they arrived.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from pathlib import Path

import numpy as np

from nano.errors import NanoError
from nano.quant import QuantizedWeight


@contextlib.contextmanager
def _no_progress_bars():
    """ai-edge-quantizer draws tqdm bars it cannot be told to skip everywhere (its graph rewrite decides by model
    size); the export shows its own progress, so the library's stderr is set aside for the call."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def tflite_layout(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) as the .tflite holds them: a kernel [in, out] (blocks along axis 0) transposed to TFLite's
    [out, in], the embedding [vocab, d_model] (blocks along axis 1) as it is; channel scales flattened."""
    codes, scales = np.asarray(weight.codes, np.int8), np.asarray(weight.scales)
    if weight.spec.axis == 0:
        codes, scales = codes.T, scales.T
    codes, scales = np.ascontiguousarray(codes), np.ascontiguousarray(scales)
    return codes, (scales if weight.spec.blockwise else scales.reshape(-1))


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()


def dequantized(weight: QuantizedWeight) -> np.ndarray:
    """codes × scales in float32, the same numbers as `QuantizedWeight.dequantize` (one float32 product each), made
    in place in one array: the embedding alone is 671 MB as float32, and JAX's version holds several such."""
    codes, scales, axis = np.asarray(weight.codes), np.asarray(weight.scales, np.float32), weight.spec.axis
    out = codes.astype(np.float32)
    block = codes.shape[axis] // scales.shape[axis]
    blocked = out.reshape(*codes.shape[:axis], scales.shape[axis], block, *codes.shape[axis + 1:])
    blocked *= np.expand_dims(scales, axis + 1)
    return out


def float_digest(weight: QuantizedWeight) -> str:
    """The content key of the float weight the converter sees (dequantized, in TFLite's layout)."""
    w = dequantized(weight)
    return _digest(w.T if weight.spec.axis == 0 else w)


def write_codes(src: Path, dst: Path, weights: dict[str, QuantizedWeight]) -> None:
    """Rewrite every FULLY_CONNECTED / EMBEDDING_LOOKUP weight of the float .tflite `src` with its codes and scales
    from `weights` (name → QuantizedWeight), to `dst`. A weight that cannot be matched is an error, not a fallback."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer
    from ai_edge_quantizer.algorithms.uniform_quantize import common_quantize
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as recovery

    by_digest = {float_digest(w): (name, w) for name, w in weights.items()}
    found: set[str] = set()

    def exact_params(op_info, tensor_config, tensor_content=None, tensor_qsv=None):
        if tensor_content is None:
            raise NanoError("export: a quantized op has no constant weight")
        key = _digest(tensor_content)
        if key not in by_digest:
            raise NanoError(f"export: a {tuple(tensor_content.shape)} weight in the converted graph matches none of "
                            "the model's quantized weights (did the converter fold something into it?)")
        name, weight = by_digest[key]
        found.add(name)
        codes, scales = tflite_layout(weight)
        return qtyping.UniformQuantParams(
            num_bits=weight.spec.bits, quantized_dimension=0, scale=scales.astype(np.float32),
            zero_point=np.zeros(scales.shape, np.int32), symmetric=True, block_size=weight.spec.block_size,
            quantized_data=codes)

    key = algorithm_manager.AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY
    ops = {qtyping.TFLOperationName.FULLY_CONNECTED: common_quantize.materialize_fc_conv,
           qtyping.TFLOperationName.EMBEDDING_LOOKUP: common_quantize.materialize_embedding_lookup}
    for op, materialize in ops.items():
        algorithm_manager.register_quantized_op(
            algorithm_key=key, tfl_op_name=op, init_qsv_func=recovery.init_qsvs,
            calibration_func=recovery.calibrate, materialize_func=functools.partial(materialize, exact_params))
    # The recipe's bits and granularity only pass its policy check; each tensor's real ones are ours.
    projection = next(w for n, w in weights.items() if n.endswith(".kernel")).spec
    granularity = (getattr(qtyping.QuantGranularity, f"BLOCKWISE_{projection.block_size}")
                   if projection.blockwise else qtyping.QuantGranularity.CHANNELWISE)
    q = quantizer.Quantizer(str(src))
    q.add_dynamic_config(".*", qtyping.TFLOperationName.FULLY_CONNECTED, projection.bits, granularity, key)
    embedding = weights.get("embedder.embedding")
    if embedding is not None:
        q.add_dynamic_config(".*", qtyping.TFLOperationName.EMBEDDING_LOOKUP, embedding.spec.bits,
                             qtyping.QuantGranularity.CHANNELWISE, key)
    with _no_progress_bars():
        result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    missing = sorted(set(weights) - found)
    if missing:
        raise NanoError(f"export: {len(missing)} quantized weights were not found in the converted graph "
                        f"(first: {missing[0]})")
    Path(dst).write_bytes(result.quantized_model)


def write_float16(src: Path, dst: Path) -> None:
    """Weights stored as float16 (the ops dequantize them to float32 once, at load)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    q = quantizer.Quantizer(str(src))
    for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP):
        q.add_weight_only_config(".*", op, 16, qtyping.QuantGranularity.TENSORWISE,
                                 algorithm_manager.AlgorithmName.FLOAT_CASTING)
    with _no_progress_bars():
        result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    Path(dst).write_bytes(result.quantized_model)


def read_back(path: Path) -> list[dict]:
    """Every integer weight in a .tflite: {"codes" (unpacked int8, TFLite layout), "scales", "block_size"}."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(str(path))
    seen, out = set(), []
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            if tensor.type not in (schema.TensorType.INT4, schema.TensorType.INT8) or tensor.buffer in seen:
                continue
            data = model.buffers[tensor.buffer].data
            if tensor.quantization is None or data is None or len(data) == 0:
                continue  # an activation, not a weight
            seen.add(tensor.buffer)
            raw = np.asarray(data, np.uint8)
            shape = tuple(tensor.shape)
            if tensor.type == schema.TensorType.INT4:
                low, high = (raw & 0x0F).astype(np.int8), (raw >> 4).astype(np.int8)
                codes = np.stack([low, high], axis=-1).reshape(-1)[:int(np.prod(shape))]
                codes = np.where(codes > 7, codes - 16, codes).astype(np.int8).reshape(shape)
            else:
                codes = raw.view(np.int8).reshape(shape)
            details = tensor.quantization.details
            if isinstance(details, schema.BlockwiseQuantizationT):
                scale_tensor = graph.tensors[details.scales]
                scales = np.asarray(model.buffers[scale_tensor.buffer].data, np.uint8).view(np.float16)
                out.append({"codes": codes, "scales": scales.reshape(tuple(scale_tensor.shape)),
                            "block_size": int(details.blockSize)})
            else:
                out.append({"codes": codes, "scales": np.asarray(tensor.quantization.scale, np.float32),
                            "block_size": 0})
    return out
