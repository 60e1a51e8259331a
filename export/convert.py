"""StableHLO → TFLite with the LiteRT converter, no TensorFlow or PyTorch.

The converter's Python API (`litert_converter.converter_api_ext`) is its low-level one, the same litert-torch
drives: deserialize each signature's StableHLO into one MLIR context, name its inputs and outputs, merge the
modules, run the StableHLO → TFL passes, write the flatbuffer. It is internal to LiteRT, so pyproject pins the
version and tests/test_export.py keeps a parity test on it.

The weights stay signature inputs named after their parameters, so the converter handles a graph of a few MB
whatever the model's size, and can fold nothing into them: each reaches a FULLY_CONNECTED or EMBEDDING_LOOKUP as
it is, and export.weights then makes it the constant the kernel reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from export.graph import Signature


def convert(signatures: Iterable[Signature], path: str | Path) -> None:
    """Write the signatures as one .tflite graph at `path`, each weight an input named after its parameter."""
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
            converter.set_signature(module.operation, sig.name, [*sig.weights, *sig.inputs], sig.outputs)
            modules.append(module)
        merged = converter.merge_modules(modules)
        config = converter.ConvertToTFLConfig()
        config.model_origin_framework = "JAX"
        converter.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
        # To bytes, then to the file: the converter's own file writer ends the process (an LLVM fatal error) when
        # the disk is full, leaving the scratch directory behind.
        Path(path).write_bytes(converter.export_flatbuffer_to_bytes(merged.operation))
