"""StableHLO → TFLite with the LiteRT converter, no TensorFlow or PyTorch.

The converter's Python API (`litert_converter.converter_api_ext`) is its low-level one, the same litert-torch
drives: deserialize each signature's StableHLO into one MLIR context, name its inputs and outputs, merge the
modules, run the StableHLO → TFL passes, write the flatbuffer. It is internal to LiteRT, so pyproject pins the
version and tests/test_export.py keeps a parity test on it. One MLIR context holds every signature, and MLIR
uniques identical constants within a context, so the weights are held once however many signatures share them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterable

from export.graph import Signature


def convert(signatures: Iterable[Signature], path: str | Path) -> None:
    """Write the signatures as one .tflite at `path`. Pass a generator: each signature's StableHLO (a serialized
    copy of the weights) is then made only when needed and released once it is in MLIR."""
    from litert_converter import converter_api_ext as converter
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir.dialects import stablehlo

    context = ir.Context()
    converter.prepare_mlir_context(context)
    with context:
        modules = []
        for sig in signatures:
            module = stablehlo.deserialize_portable_artifact(context, sig.exported.mlir_module_serialized)
            converter.set_signature(module.operation, sig.name, sig.inputs, sig.outputs)
            modules.append(module)
            del sig
            gc.collect()
        merged = converter.merge_modules(modules)
        del modules
        config = converter.ConvertToTFLConfig()
        config.model_origin_framework = "JAX"
        converter.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
        converter.export_flatbuffer_to_file(merged.operation, str(path))
