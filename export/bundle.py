"""The .litertlm bundle: the .tflite, the SentencePiece tokenizer, LlmMetadata and the executor's cache layout,
plus provenance (source config hash, quantization, tool versions, SHA-256 of every section and weight) as system
metadata.

LlmMetadata: BOS as start token (the engine adds it on the first turn), EOS and <end_of_turn> as stop tokens, the
context, and a TOP_P sampler with k = 1 (greedy: the CPU engine implements TOP_P only). The model type is
`generic_model` with no prompt template: nano's models are base models, so a prompt reaches the model as written.
The executor metadata names every cache buffer as global or local with its sequence axis, so the engine sizes
the context from the global layers while local layers keep window-sized rings.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from export.graph import sequence_axis
from export.io_names import K_CACHE, V_CACHE
from export.integrity import DIGESTS, check_artifact, file_digests
from nano.config import GLOBAL, ModelConfig


def llm_metadata(tokenizer, max_tokens: int) -> bytes:
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, sampler_params_pb2

    meta = llm_metadata_pb2.LlmMetadata()
    meta.start_token.token_ids.ids.append(tokenizer.bos_id)
    for stop in tokenizer.stop_ids:
        meta.stop_tokens.add().token_ids.ids.append(stop)
    meta.pad_token.token_ids.ids.append(tokenizer.pad_id)
    meta.max_num_tokens = max_tokens
    meta.sampler_params.type = sampler_params_pb2.SamplerParameters.TOP_P
    meta.sampler_params.k = 1
    meta.sampler_params.p = 1.0
    meta.sampler_params.temperature = 1.0
    meta.llm_model_type.generic_model.SetInParent()
    meta.supports_thinking = False
    meta.supports_function_calling = False
    return meta.SerializeToString()


def executor_metadata(config: ModelConfig) -> bytes:
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as pb

    meta = pb.ExecutorMetadata()
    for i, layer_type in enumerate(config.layer_types):
        is_global = layer_type == GLOBAL
        for root, kind in ((K_CACHE, "KEY"), (V_CACHE, "VALUE")):
            buffer = meta.llm_executor_metadata.state_buffers.add()
            name = f"{root}{i}"
            buffer.prefill_input_name = buffer.prefill_output_name = name
            buffer.decode_input_name = buffer.decode_output_name = name
            buffer.type = getattr(pb.StateBuffer, f"TYPE_{'GLOBAL' if is_global else 'LOCAL'}_{kind}_CACHE")
            buffer.sequence_axis = sequence_axis(config, keys=kind == "KEY")  # values are stored transposed
    return meta.SerializeToString()


def build(tflite: Path, out: Path, *, tokenizer, config: ModelConfig, max_tokens: int, provenance: dict) -> None:
    """Write the bundle. The provenance gains `digests` (export.integrity.file_digests): the SHA-256 of each file
    that becomes a section (the builder copies them byte for byte) and of each weight buffer of the .tflite; the
    written bundle is then checked against them, so a bundle leaves here only if `nano verify` passes it."""
    from litert_lm_builder import litertlm_builder as lb

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "llm_metadata.pb").write_bytes(llm_metadata(tokenizer, max_tokens))
        (tmp / "executor_metadata.pb").write_bytes(executor_metadata(config))
        tokenizer.save(tmp / "tokenizer.model")
        digests = file_digests({"LlmMetadataProto": tmp / "llm_metadata.pb", "TFLiteModel": tflite,
                                "ExecutorMetadataProto": tmp / "executor_metadata.pb",
                                "SP_Tokenizer": tmp / "tokenizer.model"})
        builder = lb.LitertLmFileBuilder()
        for key, value in {**provenance, DIGESTS: digests}.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            builder.add_system_metadata(lb.Metadata(key=f"nano.{key}", value=text, dtype=lb.DType.STRING))
        builder.add_llm_metadata(str(tmp / "llm_metadata.pb"))
        builder.add_tflite_model(str(tflite), lb.TfLiteModelType.PREFILL_DECODE, backend_constraint="cpu")
        builder.add_executor_metadata(str(tmp / "executor_metadata.pb"))
        builder.add_sentencepiece_tokenizer(str(tmp / "tokenizer.model"))
        with open(out, "wb") as f:
            builder.build(f, validate_metadata=True)
    check_artifact(out)


def read_provenance(path: Path) -> dict:
    """The nano.* system metadata of a .litertlm (provenance written by `build`)."""
    import io

    from litert_lm_builder import litertlm_peek as peek

    header = peek.read_litertlm_header(str(path), io.StringIO())
    entries = header.SystemMetadata()
    out = {}
    for i in range(entries.EntriesLength()):
        item = peek.kvp_to_dict(entries.Entries(i))
        if str(item["key"]).startswith("nano."):
            value = item["value"]
            try:
                value = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                pass
            out[item["key"][len("nano."):]] = value
    return out
