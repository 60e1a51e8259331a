"""StableHLO → TFLite with the LiteRT converter, no TensorFlow or PyTorch.

The converter's Python API (`litert_converter.converter_api_ext`) is its low-level one, the same litert-torch
drives: deserialize each signature's StableHLO into one MLIR context, bind its weight arguments to constants,
name its inputs and outputs, merge the modules, run the StableHLO → TFL passes, write the flatbuffer. It is
internal to LiteRT, so pyproject pins the version and tests/test_export.py keeps a parity test on it.

Weights enter MLIR one tensor at a time, straight from the model (a quantized weight dequantized just then), and
MLIR uniques identical constants within a context, so every signature shares one copy of each.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from export.graph import Signature


def _bind_weights(module, signature: Signature, weight: Callable[[int], np.ndarray]) -> None:
    """Replace `main`'s leading weight arguments by constants holding the weights, and drop them from its type."""
    from litert_converter.mlir import ir
    from litert_converter.mlir.dialects import stablehlo

    main = next(op for op in module.body.operations
                if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == "main")
    block = main.regions[0].blocks[0]
    with ir.InsertionPoint.at_block_begin(block):
        for arg, index in zip(list(block.arguments)[:len(signature.weights)], signature.weights):
            constant = stablehlo.ConstantOp(ir.DenseElementsAttr.get(np.ascontiguousarray(weight(index), np.float32)))
            arg.replace_all_uses_with(constant.result)
    for _ in signature.weights:
        block.erase_argument(0)
    kind = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    n = len(signature.weights)
    main.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(kind.inputs[n:], kind.results))
    if "arg_attrs" in main.attributes:
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(list(ir.ArrayAttr(main.attributes["arg_attrs"]))[n:])


def convert(signatures: Iterable[Signature], weight: Callable[[int], np.ndarray], path: str | Path) -> None:
    """Write the signatures as one .tflite at `path`; `weight(i)` gives weight argument i as an array."""
    # The converter carries TensorFlow's oneDNN kernels for constant folding. Off: they may pick AMX, which has
    # crashed on this project's machines, and they announce themselves on stderr.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from litert_converter import converter_api_ext as converter
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir.dialects import stablehlo

    context = ir.Context()
    converter.prepare_mlir_context(context)
    with context, ir.Location.unknown():
        modules = []
        for sig in signatures:
            module = stablehlo.deserialize_portable_artifact(context, sig.exported.mlir_module_serialized)
            _bind_weights(module, sig, weight)
            converter.set_signature(module.operation, sig.name, sig.inputs, sig.outputs)
            modules.append(module)
        del weight  # every weight is a constant now: let the model behind `weight` go before the passes
        gc.collect()
        merged = converter.merge_modules(modules)
        del modules
        config = converter.ConvertToTFLConfig()
        config.model_origin_framework = "JAX"
        converter.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
        converter.export_flatbuffer_to_file(merged.operation, str(path))
