"""`nano verify` / export.integrity: a damaged artifact is one clear line and a non-zero exit before any native
runtime maps it (never a signal), and a file whose bytes changed since the export is a digest mismatch.

The fast tests build a small TFLite flatbuffer by hand (one FULLY_CONNECTED, a 256 KiB weight stored after the
flatbuffer, as the export stores weights) and bundle it with export.bundle; the slow one checks a real export."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from export import bundle
from export.integrity import check_artifact
from nano.config import TINY
from nano.errors import NanoError

NANO = Path(sys.executable).parent / "nano"
WIDTH = 256  # the weight is WIDTH × WIDTH float32: 256 KiB, so the first 100 kB of a bundle end inside it


def write_tflite(path: Path, mutate=None) -> bytes:
    """A one-layer TFLite model whose weight is stored by (offset, size) after the flatbuffer; `mutate(model)`
    damages the object model before it is packed. Returns the weight's bytes."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    def tensor(name: str, shape: list[int], buffer: int):
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, schema.TensorType.FLOAT32, buffer
        return t

    def tensor_map(name: str, index: int):
        m = schema.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m

    model = schema.ModelT()
    model.version, model.description = 3, "integrity test"
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    model.operatorCodes = [code]
    weight_buffer = schema.BufferT()
    weight_buffer.offset = weight_buffer.size = 1  # placeholders, set once the flatbuffer's size is known
    model.buffers = [schema.BufferT(), weight_buffer]
    graph = schema.SubGraphT()
    graph.tensors = [tensor("x", [1, WIDTH], 0), tensor("w", [WIDTH, WIDTH], 1), tensor("y", [1, WIDTH], 0)]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, -1], [2]
    graph.operators, graph.inputs, graph.outputs = [op], [0], [2]
    model.subgraphs = [graph]
    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = "decode", 0
    signature.inputs, signature.outputs = [tensor_map("x", 0)], [tensor_map("y", 2)]
    model.signatureDefs = [signature]
    if mutate:
        mutate(model)
    head = flatbuffer_utils.convert_object_to_bytearray(model)
    weight = np.random.default_rng(0).standard_normal((WIDTH, WIDTH)).astype(np.float32).tobytes()
    offset = -(-len(head) // 16) * 16
    flatbuffer_utils.update_packed_buffer(schema.Model.GetRootAs(head, 0).Buffers(1), offset=offset, size=len(weight))
    path.write_bytes(bytes(head) + b"\0" * (offset - len(head)) + weight)
    return weight


@pytest.fixture(scope="module")
def tflite(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("integrity") / "one.tflite"
    return path, write_tflite(path)


@pytest.fixture(scope="module")
def bundled(tflite, tiny_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "one.litertlm"
    bundle.build(tflite[0], out, tokenizer=tiny_tokenizer, config=TINY, max_tokens=64, provenance={"source": "test"})
    return out


def _damaged(source: Path, tmp_path: Path, change) -> Path:
    data = bytearray(source.read_bytes())
    change(data)
    out = tmp_path / f"damaged{source.suffix}"
    out.write_bytes(bytes(data))
    return out


def _refused(path: Path, message: str) -> None:
    with pytest.raises(NanoError, match=message) as info:
        check_artifact(path)
    assert "\n" not in str(info.value)


def test_a_good_bundle_and_tflite_pass_with_their_digests(bundled, tflite):
    summary = check_artifact(bundled)
    assert summary.kind == "litertlm" and summary.digests_checked == 4
    assert summary.sections == ["LlmMetadataProto", "TFLiteModel", "ExecutorMetadataProto", "SP_Tokenizer"]
    assert summary.signatures == ["decode"] and summary.line().startswith(f"OK {bundled}")
    digests = bundle.read_provenance(bundled)["digests"]
    assert digests["sections"]["TFLiteModel"] == hashlib.sha256(tflite[0].read_bytes()).hexdigest()
    assert digests["tflite_buffers"] == {"1": hashlib.sha256(tflite[1]).hexdigest()[:16]}  # names a changed weight
    plain = check_artifact(tflite[0])
    assert plain.kind == "tflite" and plain.buffers == 2 and plain.digests_checked == 0


def test_truncated_bundle_is_one_line_and_never_a_signal(bundled, tmp_path):
    """The issue's case: the first 100 kB of a good .litertlm (the engine itself dies of SIGSEGV on it)."""
    truncated = tmp_path / "truncated.litertlm"
    truncated.write_bytes(bundled.read_bytes()[:100_000])
    result = subprocess.run([NANO, "verify", truncated], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result  # a signal would be negative
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: {truncated}: section 1 (TFLiteModel) ends at byte "
                                          f"{bundle_section_end(bundled, 1):,}, past the end of the file (100,000 "
                                          "bytes): the file is truncated"]


def bundle_section_end(path: Path, index: int) -> int:
    from litert_lm_builder import litertlm_peek as peek
    import io

    return peek.read_litertlm_header(str(path), io.StringIO()).SectionMetadata().Objects(index).EndOffset()


def test_overwritten_weights_are_a_digest_mismatch(bundled, tflite, tmp_path):
    """The issue's other case: 4 KiB of the weights overwritten. The structure is intact; only the digests see it,
    and they name the weight."""
    start = bundled.read_bytes().index(tflite[1][:64]) + 8192  # inside the weight
    damaged = _damaged(bundled, tmp_path, lambda d: d.__setitem__(slice(start, start + 4096), os.urandom(4096)))
    result = CliRunner().invoke(cli, ["verify", str(damaged)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"Error: {damaged}: digest mismatch in section 1 (TFLiteModel): 1 of 1 "
                                          "weights changed, first buffer 1 (w); the file is not the one that was "
                                          "exported and verified"]
    good = CliRunner().invoke(cli, ["verify", str(bundled)])
    assert good.exit_code == 0 and good.output.startswith(f"OK {bundled}")
    assert "sha256 of 4 sections match" in good.output


def test_damaged_tokenizer_section_is_a_digest_mismatch(bundled, tmp_path):
    def flip(data: bytearray) -> None:  # the tokenizer is the last section: it ends the file
        data[-100] ^= 0xFF

    _refused(_damaged(bundled, tmp_path, flip), r"digest mismatch in section 3 \(SP_Tokenizer\);")


@pytest.mark.parametrize("case, change, message", [
    ("random bytes", lambda d: d.__setitem__(slice(0, len(d)), random.Random(0).randbytes(len(d))), "neither a"),
    ("empty", lambda d: d.clear(), "is empty"),
    ("short", lambda d: d.__delitem__(slice(20, None)), "shorter than the 32-byte"),
    ("version", lambda d: d.__setitem__(slice(8, 12), struct.pack("<I", 2)), r"format version 2\.\d+\.\d+"),
    ("header end", lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 10**12)), "header ends at byte"),
    ("header bytes", lambda d: d.__setitem__(slice(32, 40), b"\xff" * 8), "the header is not a valid flatbuffer"),
])
def test_damaged_container_is_refused_in_one_line(bundled, tmp_path, case, change, message):
    _refused(_damaged(bundled, tmp_path, change), message)


def _set(path: str, value):
    """mutate(model) setting model.<path> (dots; integers index lists) to value."""
    def mutate(model):
        *parents, last = path.split(".")
        obj = model
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if last.isdigit():
            obj[int(last)] = value
        else:
            setattr(obj, last, value)
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("subgraphs.0.tensors.1.buffer", 7), r"tensor 1 \('w'\) uses buffer 7, which does not exist"),
    (_set("subgraphs.0.operators.0.inputs", [0, 9, -1]), "refers to tensor 9, which does not exist"),
    (_set("subgraphs.0.operators.0.opcodeIndex", 3), "has opcode 3 of 1"),
    (_set("subgraphs.0.tensors.1.shape", [WIDTH, 2 * WIDTH]), r"tensor 1 \('w'\) needs 524,288 bytes, its buffer"),
    (_set("signatureDefs.0.subgraphIndex", 2), "signature decode runs subgraph 2, which does not exist"),
    (_set("signatureDefs.0.outputs.0.tensorIndex", 5), "signature decode names tensor 5"),
])
def test_broken_tflite_indices_are_refused(tmp_path, mutate, message):
    path = tmp_path / "broken.tflite"
    write_tflite(path, mutate)
    _refused(path, message)


def test_truncated_tflite_is_refused(tflite, tmp_path):
    data = tflite[0].read_bytes()
    _refused(_damaged(tflite[0], tmp_path, lambda d: d.__delitem__(slice(len(data) - 4096, None))),
             r"buffer 1 \(bytes .*\) lies past the end of the model")
    _refused(_damaged(tflite[0], tmp_path, lambda d: d.__delitem__(slice(200, None))), "not a valid flatbuffer")


def test_any_damaged_flatbuffer_byte_is_refused_or_harmless(tflite, tmp_path):
    """Random damage to the flatbuffer's bytes either passes the structure check or is refused with NanoError:
    never another exception (the check must not itself be a way to crash)."""
    data = tflite[0].read_bytes()
    head = len(data) - WIDTH * WIDTH * 4
    rng, refused = random.Random(0), 0
    path = tmp_path / "fuzz.tflite"
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 4))):
            damaged[rng.randrange(head)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            check_artifact(path)
        except NanoError:
            refused += 1
    assert refused > 100  # most bytes of a flatbuffer are offsets, lengths and indices


@pytest.mark.slow
def test_a_real_export_records_digests_and_damage_is_caught(tiny_model_dir, tmp_path):
    """A real tiny export: `nano verify` passes it with every digest, and refuses it cut to 100 kB (no signal) or
    with 4 KiB of its weights overwritten."""
    from export.run import export
    from export.settings import ExportSettings

    out = tmp_path / "tiny.litertlm"
    export(str(tiny_model_dir), out, ExportSettings(prefill_lengths=(4, 16), max_tokens=64))
    ok = subprocess.run([NANO, "verify", out], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sha256 of 4 sections match" in ok.stdout and ok.stderr == ""
    truncated = tmp_path / "cut.litertlm"
    truncated.write_bytes(out.read_bytes()[:100_000])
    cut = subprocess.run([NANO, "verify", truncated], capture_output=True, text=True, timeout=120)
    assert cut.returncode == 1 and len(cut.stderr.splitlines()) == 1 and "the file is truncated" in cut.stderr
    tflite_begin = bundle_section_end(out, 0) + 1
    middle = (tflite_begin + bundle_section_end(out, 1)) // 2
    damaged = _damaged(out, tmp_path, lambda d: d.__setitem__(slice(middle, middle + 4096), os.urandom(4096)))
    result = CliRunner().invoke(cli, ["verify", str(damaged)])
    assert result.exit_code == 1 and "digest mismatch in section 1 (TFLiteModel)" in result.output
    assert len(result.output.splitlines()) == 1


def test_a_header_the_engine_cannot_read_is_refused_at_export(tflite, tiny_tokenizer, tmp_path):
    """LiteRT-LM reads at most 16 KiB of header: whole SHA-256s of the teacher's 362 weights (~27 kB of provenance)
    made bundles it refused ("Failed to read header data"). The export refuses such a bundle itself, and the
    weights' digests are kept short enough that a 362-weight record fits."""
    from export.integrity import BUFFER_DIGEST_HEX, ENGINE_HEADER_MAX

    out = tmp_path / "big.litertlm"
    with pytest.raises(NanoError, match="past the 16,384 bytes the LiteRT-LM engine reads"):
        bundle.build(tflite[0], out, tokenizer=tiny_tokenizer, config=TINY, max_tokens=64,
                     provenance={"source": "test", "padding": "x" * ENGINE_HEADER_MAX})
    record = {str(i): "0" * BUFFER_DIGEST_HEX for i in range(362)}
    bundle.build(tflite[0], out, tokenizer=tiny_tokenizer, config=TINY, max_tokens=64,
                 provenance={"source": "test", "teacher_sized_digests": record})
    assert check_artifact(out).digests_checked == 4
