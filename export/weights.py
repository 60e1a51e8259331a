"""The weights in the .tflite: the converter's graph takes every weight as a signature input (export.convert), and
`bind` turns each such input into the constant tensor LiteRT's kernels read, in every signature that takes it:

- float32 as it is; fp16 as FLOAT16 behind a DEQUANTIZE op (the pattern XNNPACK loads as float16 weights);
- a `QuantizedWeight` as the codes and scales `nano quantize` chose, unchanged: INT4 (two per byte, the even
  element in the low nibble) or INT8, symmetric; blockwise with a FLOAT16 scales tensor (BlockwiseQuantization) or
  one float32 scale per output row. The kernels quantize activations to int8 at run time ("dynamic" quantization,
  XNNPACK's int8 × int4 kernels). A FULLY_CONNECTED weight is [out, in]; the embedding [vocab, d_model] is one
  tensor shared by the lookup and the tied head.

The bytes follow the flatbuffer, each buffer at an (offset, size) in the file (TFLite's layout for models past its
2 GB flatbuffer limit), written one weight at a time: no copy of the model is ever assembled in memory, and a model
of any size fits. `read_back` parses the written file so the export can prove the codes arrived.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from nano.errors import NanoError
from nano.quant import QuantizedWeight, pack_int4, unpack_int4

ALIGN = 16  # each buffer starts 16-byte aligned, as TFLite writes them (SIMD loads)
_QUANTIZED_CONSUMERS = {"FULLY_CONNECTED": 1, "EMBEDDING_LOOKUP": 1}  # op → the input slot of its weight


def tflite_layout(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) as the .tflite holds them: a kernel [in, out] (blocks along axis 0) transposed to TFLite's
    [out, in], the embedding [vocab, d_model] (blocks along axis 1) as it is; channel scales flattened."""
    codes = np.asarray(weight.codes, np.int8)
    return np.ascontiguousarray(codes.T if weight.spec.axis == 0 else codes), tflite_scales(weight)


def tflite_scales(weight: QuantizedWeight) -> np.ndarray:
    """The scales half of `tflite_layout`."""
    scales = np.asarray(weight.scales)
    scales = np.ascontiguousarray(scales.T if weight.spec.axis == 0 else scales)
    return scales if weight.spec.blockwise else scales.reshape(-1)


@dataclasses.dataclass
class _Payload:
    """One buffer written after the flatbuffer: its size is known when the flatbuffer is packed, its bytes are
    made only when written."""
    buffer: int
    nbytes: int
    data: Callable[[], np.ndarray]


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Binder:
    def __init__(self, model, params: Mapping[str, object], transposed: Callable[[str], bool], float16: bool):
        from ai_edge_litert import schema_py_generated as schema

        self.schema, self.model, self.params = schema, model, params
        self.transposed, self.float16 = transposed, float16
        self.buffers: dict[str, int] = {}  # weight (or weight's scales) → its buffer, shared by every signature
        self.payloads: list[_Payload] = []
        self.ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def buffer(self, key: str, nbytes: int, data: Callable[[], np.ndarray]) -> int:
        if key not in self.buffers:
            buffer = self.schema.BufferT()
            buffer.offset = buffer.size = 1  # non-default placeholders: the packed table keeps room for the real ones
            self.model.buffers.append(buffer)
            self.buffers[key] = len(self.model.buffers) - 1
            self.payloads.append(_Payload(self.buffers[key], nbytes, data))
        return self.buffers[key]

    def opcode(self, builtin: int) -> int:
        for i, code in enumerate(self.model.operatorCodes):
            if code.builtinCode == builtin:
                return i
        code = self.schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def bind_signature(self, signature) -> None:
        graph = self.model.subgraphs[signature.subgraphIndex]
        bound = {}
        for entry in signature.inputs:
            name = entry.name.decode()
            if name in self.params:
                self.bind(graph, entry.tensorIndex, name, self.params[name])
                bound[entry.tensorIndex] = name
        signature.inputs = [e for e in signature.inputs if e.tensorIndex not in bound]
        graph.inputs = np.array([i for i in graph.inputs if i not in bound], np.int32)

    def consumers(self, graph, tensor: int) -> list[tuple[int, str, int]]:
        """(operator index, op name, input slot) of every use of `tensor`."""
        return [(k, self.ops[self.model.operatorCodes[op.opcodeIndex].builtinCode], slot)
                for k, op in enumerate(graph.operators) for slot, i in enumerate(op.inputs) if i == tensor]

    def bind(self, graph, index: int, name: str, value) -> None:
        schema, tensor = self.schema, graph.tensors[index]
        uses = self.consumers(graph, index)
        weight_slot = all(_QUANTIZED_CONSUMERS.get(op) == slot for _, op, slot in uses)
        shape = tuple(int(d) for d in tensor.shape)
        if isinstance(value, QuantizedWeight):
            if not weight_slot:
                raise NanoError(f"export: the quantized weight {name} feeds {sorted({op for _, op, _ in uses})}; "
                                "only FULLY_CONNECTED and EMBEDDING_LOOKUP take integer weights")
            self.bind_quantized(graph, tensor, name, value, shape)
            return
        expected = tuple(value.shape[::-1]) if self.transposed(name) else tuple(value.shape)
        if expected != shape:
            raise NanoError(f"export: {name} is {expected} in TFLite's layout, the graph takes {shape}")
        def as_float(dtype):  # the bytes, made when written: a converted copy is never held while others bind
            def data():
                array = np.asarray(value, np.float32)
                return np.ascontiguousarray((array.T if self.transposed(name) else array).astype(dtype))
            return data
        if not (self.float16 and uses and weight_slot):
            tensor.buffer = self.buffer(name, math.prod(shape) * 4, as_float(np.float32))
            return
        half = schema.TensorT()  # the float16 constant; the graph's float32 tensor becomes DEQUANTIZE's output
        half.name, half.type, half.shape = tensor.name + b"_fp16", schema.TensorType.FLOAT16, np.array(shape, np.int32)
        half.buffer = self.buffer(name, math.prod(shape) * 2, as_float(np.float16))
        graph.tensors.append(half)
        op = schema.OperatorT()
        op.opcodeIndex = self.opcode(schema.BuiltinOperator.DEQUANTIZE)
        op.inputs, op.outputs = np.array([len(graph.tensors) - 1], np.int32), np.array([index], np.int32)
        graph.operators.insert(min(k for k, _, _ in uses), op)

    def bind_quantized(self, graph, tensor, name: str, weight: QuantizedWeight, shape) -> None:
        schema, spec = self.schema, weight.spec
        layout = tuple(weight.shape[::-1]) if spec.axis == 0 else tuple(weight.shape)
        if layout != shape:
            raise NanoError(f"export: {name}'s codes are {layout} in TFLite's layout, the graph takes {shape}")
        n = math.prod(shape)

        def codes():
            c = tflite_layout(weight)[0]
            return pack_int4(c, -1) if spec.bits == 4 else c

        tensor.type = schema.TensorType.INT4 if spec.bits == 4 else schema.TensorType.INT8
        tensor.buffer = self.buffer(name, (n + 1) // 2 if spec.bits == 4 else n, codes)
        q = schema.QuantizationParametersT()
        if spec.blockwise:
            scales_shape = shape[:-1] + (shape[-1] // spec.block(weight.shape),)
            scales = schema.TensorT()
            scales.name, scales.type = tensor.name + b"_scales", schema.TensorType.FLOAT16
            scales.shape = np.array(scales_shape, np.int32)
            scales.buffer = self.buffer(f"{name}:scales", math.prod(scales_shape) * 2,
                                        lambda: tflite_scales(weight).astype(np.float16))
            graph.tensors.append(scales)
            q.detailsType = schema.QuantizationDetails.BlockwiseQuantization
            q.details = schema.BlockwiseQuantizationT()
            q.details.scales, q.details.zeroPoints, q.details.blockSize = len(graph.tensors) - 1, -1, spec.block_size
        else:
            scales = tflite_scales(weight).astype(np.float32)
            q.scale, q.zeroPoint, q.quantizedDimension = scales, np.zeros(len(scales), np.int64), 0
        tensor.quantization = q


def bind(graph: str | Path, out: str | Path, params: Mapping[str, object], *, transposed: Callable[[str], bool],
         float16: bool = False) -> int:
    """Write `graph` (a converted .tflite whose weights are signature inputs named after their parameters) to
    `out` with every such input bound to its value in `params` (name → float array or QuantizedWeight);
    `transposed(name)` says which float weights the graph takes as [out, in]. `float16` stores float
    FULLY_CONNECTED / EMBEDDING_LOOKUP weights as float16. Returns the bytes of weights written."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(graph))
    binder = _Binder(model, params, transposed, float16)
    for signature in model.signatureDefs:
        binder.bind_signature(signature)
    head = flatbuffer_utils.convert_object_to_bytearray(model)
    packed = flatbuffer_utils.Model.GetRootAs(head, 0)
    offset = _round_up(len(head))
    offsets = []
    for payload in binder.payloads:
        offsets.append(offset)
        flatbuffer_utils.update_packed_buffer(packed.Buffers(payload.buffer), offset=offset, size=payload.nbytes)
        offset = _round_up(offset + payload.nbytes)
    with open(out, "wb") as f:
        f.write(head)
        for payload, start in zip(binder.payloads, offsets):
            f.write(b"\0" * (start - f.tell()))
            data = np.ascontiguousarray(payload.data())
            if data.nbytes != payload.nbytes:
                raise RuntimeError(f"export: buffer {payload.buffer} has {data.nbytes} bytes, {payload.nbytes} planned")
            f.write(memoryview(data).cast("B"))
    return sum(p.nbytes for p in binder.payloads)


def read_flatbuffer(file: mmap.mmap):
    """The model (schema ModelT) from a mapped .tflite, without the weights stored after the flatbuffer (those
    buffers keep their offset and size): a few MB whatever the file's size."""
    from ai_edge_litert import schema_py_generated as schema

    packed = schema.Model.GetRootAs(file, 0)
    offsets = [packed.Buffers(i).Offset() for i in range(packed.BuffersLength())]
    end = min((o for o in offsets if o > 1), default=len(file))
    return schema.ModelT.InitFromPackedBuf(file[:end], 0)


def read_back(path: str | Path) -> Iterator[dict]:
    """Every integer weight in a .tflite, one at a time: {"codes" (unpacked int8, TFLite layout), "scales",
    "block_size"}."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as file:
        model = read_flatbuffer(file)

        def data(index: int) -> np.ndarray:
            buffer = model.buffers[index]
            if buffer.data is not None and len(buffer.data):
                return np.asarray(buffer.data, np.uint8)
            if buffer.offset > 1:  # stored after the flatbuffer: read now, one weight at a time
                return np.frombuffer(file[buffer.offset:buffer.offset + buffer.size], np.uint8)
            return np.zeros(0, np.uint8)

        seen = set()
        for graph in model.subgraphs:
            for tensor in graph.tensors:
                if tensor.type not in (schema.TensorType.INT4, schema.TensorType.INT8) or tensor.buffer in seen:
                    continue
                raw = data(tensor.buffer)
                if tensor.quantization is None or raw.size == 0:
                    continue  # an activation, not a weight
                seen.add(tensor.buffer)
                shape = tuple(int(d) for d in tensor.shape)
                if tensor.type == schema.TensorType.INT4:
                    codes = unpack_int4(raw, 0)[:math.prod(shape)].reshape(shape)
                else:
                    codes = raw.view(np.int8).reshape(shape)
                details = tensor.quantization.details
                if isinstance(details, schema.BlockwiseQuantizationT):
                    scale_tensor = graph.tensors[details.scales]
                    scales = data(scale_tensor.buffer).view(np.float16)
                    yield {"codes": codes, "scales": scales.reshape(tuple(scale_tensor.shape)),
                           "block_size": int(details.blockSize)}
                else:
                    yield {"codes": codes, "scales": np.asarray(tensor.quantization.scale, np.float32),
                           "block_size": 0}
