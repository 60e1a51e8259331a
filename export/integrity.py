"""Is an artifact whole, and is it the file that was exported? Checked in Python before any native runtime sees it.

The LiteRT-LM engine and ai-edge-litert trust what they map: the engine reads the .litertlm header, then maps each
section at the offsets it names (LiteRT-LM `schema/core/litertlm_read.cc`) and builds the TFLite model from the
mapped bytes with `FlatBufferModel::BuildFromBuffer`, which runs no flatbuffer verifier. A damaged file can then
die of SIGSEGV (the issue's truncated bundle did; so did 11 of 30 randomly damaged .tflite flatbuffers in
ai-edge-litert 2.3.0 here), and overwritten weights run without a word. So, on the bytes alone:

- the container: magic `LITERTLM`, major version 1, the header's end inside the file (its offset at byte 24, the
  header flatbuffer from byte 32), every section of a known type, non-empty, after the header, inside the file,
  and not overlapping another;
- each TFLite flatbuffer (a TFLiteModel section, or a bare .tflite): every table, vector and string the schema
  reaches lies inside the buffer (a bounds-checked walk: the checks of the C++ flatbuffers Verifier), every
  buffer stored by (offset, size) lies inside the model, every index (tensor → buffer, operator → tensor and
  opcode, signature → subgraph and tensor) points at something that exists, and every constant tensor's buffer
  holds the bytes its shape and type need;
- the digests: `export.bundle` records the SHA-256 of every section and of every weight buffer of the TFLite
  model in the provenance (`nano.digests`); each section must hash to its record, and a damaged TFLite section is
  narrowed down to the weights that differ.

`check_artifact(path)` returns a summary or raises NanoError with one line naming what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import mmap
import struct
import threading
from pathlib import Path

import flatbuffers
from flatbuffers import encode
from flatbuffers import number_types as N

from nano.errors import NanoError

MAGIC = b"LITERTLM"
MAJOR_VERSION = 1  # the engine refuses any other major version
# LiteRT-LM's loader maps this much of the file for the header (kLitertLmHeaderMaxSize, runtime/util/
# litert_lm_loader.h) and refuses a header that ends later: "Failed to read header data".
ENGINE_HEADER_MAX = 16 * 1024
HEADER_END_AT, HEADER_BEGIN = 24, 32
TFLITE_IDENTIFIER = b"TFL3"
DIGESTS = "digests"  # provenance key (system metadata `nano.digests`)
TFLITE_SECTION = "TFLiteModel"
_BITS = {"FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "FLOAT64": 64, "INT64": 64, "UINT64": 64, "INT32": 32,
         "UINT32": 32, "INT16": 16, "UINT16": 16, "INT8": 8, "UINT8": 8, "BOOL": 8, "INT4": 4, "UINT4": 4, "INT2": 2}


_SWAP = threading.Lock()


class _Malformed(Exception):
    pass


class _CheckedTable(flatbuffers.table.Table):
    """flatbuffers' Table with bounds checks on every read. The plain Python reader would read a negative position
    from the end of the buffer and cut a string short without a word; this one refuses both, as the C++ Verifier
    does, so a walk over the whole schema proves every table, vector and string lies inside the buffer."""

    __slots__ = ()

    def _read(self, flags, off: int):
        if not 0 <= off <= len(self.Bytes) - flags.bytewidth:
            raise _Malformed(f"a reference to byte {off} lies outside the {len(self.Bytes):,}-byte flatbuffer")
        return flags.py_type(encode.Get(flags.packer_type, self.Bytes, off))

    def Get(self, flags, off):
        return self._read(flags, off)

    def Offset(self, vtableOffset):
        vtable = self.Pos - self._read(N.SOffsetTFlags, self.Pos)
        size = self._read(N.VOffsetTFlags, vtable)
        if size < 4 or size % 2 or vtable + size > len(self.Bytes):
            raise _Malformed(f"a table's vtable at byte {vtable} is malformed")
        return self._read(N.VOffsetTFlags, vtable + vtableOffset) if vtableOffset < size else 0

    def Indirect(self, off):
        return off + self._read(N.UOffsetTFlags, off)

    def String(self, off):
        start = self.Indirect(off)
        length = self._read(N.UOffsetTFlags, start)
        if start + 4 + length >= len(self.Bytes):  # its terminating zero must be inside too
            raise _Malformed(f"a string at byte {start} runs past the end of the flatbuffer")
        return bytes(self.Bytes[start + 4:start + 4 + length])

    def VectorLen(self, off):
        return self._read(N.UOffsetTFlags, self.Indirect(self.Pos + off))

    def Vector(self, off):
        start = self.Indirect(self.Pos + off)
        self._read(N.UOffsetTFlags, start)
        return start + N.UOffsetTFlags.bytewidth

    def Union(self, t2, off):
        t2.Pos = self.Indirect(self.Pos + off)
        t2.Bytes = self.Bytes

    def GetVectorAsNumpy(self, flags, off):
        start, length = self.Vector(off), self.VectorLen(off)
        if start + length * flags.bytewidth > len(self.Bytes):
            raise _Malformed(f"a vector at byte {start} runs past the end of the flatbuffer")
        return super().GetVectorAsNumpy(flags, off)


@contextlib.contextmanager
def _checked(what: str):
    """Run a walk over a flatbuffer with every read checked: the generated readers make their tables through
    `flatbuffers.table.Table`, so _CheckedTable stands in for it while they run (one check at a time; a reader of a
    valid buffer elsewhere sees the same values meanwhile). Whatever a malformed buffer makes them raise becomes
    one NanoError line."""
    with _SWAP:
        original = flatbuffers.table.Table
        flatbuffers.table.Table = _CheckedTable
        try:
            yield
        except Exception as e:  # whatever a malformed buffer makes the generated readers raise
            reason = str(e) if isinstance(e, _Malformed) else f"{type(e).__name__}: {e}"
            raise NanoError(f"{what} is not a valid flatbuffer: truncated or damaged ({reason})") from None
        finally:
            flatbuffers.table.Table = original


@dataclasses.dataclass
class ArtifactSummary:
    path: str
    kind: str  # "litertlm" or "tflite"
    bytes: int
    version: str = ""
    sections: list[str] = dataclasses.field(default_factory=list)
    signatures: list[str] = dataclasses.field(default_factory=list)
    buffers: int = 0
    digests_checked: int = 0  # sections whose SHA-256 matched the export's record

    def line(self) -> str:
        tflite = f"TFLite with {len(self.signatures)} signatures ({', '.join(self.signatures)}), {self.buffers} buffers"
        if self.kind == "tflite":
            return f"OK {self.path}: {tflite}, {self.bytes:,} bytes, structure checked (a bare .tflite has no digests)"
        digests = (f"sha256 of {self.digests_checked} sections match the export's" if self.digests_checked else
                   "no digests in its provenance: structure only")
        return (f"OK {self.path}: LiteRT-LM {self.version}, {len(self.sections)} sections "
                f"({', '.join(self.sections)}) inside its {self.bytes:,} bytes; {tflite}; {digests}")


def check_artifact(path: str | Path) -> ArtifactSummary:
    """Check a .litertlm or .tflite (told apart by their bytes) as the module docstring says; NanoError with one
    line naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise NanoError(f"{path} is empty")
    data = _mapped(path)
    if data[:8] == MAGIC:
        return _check_litertlm(path, data)
    if data[4:8] == TFLITE_IDENTIFIER:
        summary = ArtifactSummary(str(path), "tflite", size)
        _check_tflite(data, str(path), summary)
        return summary
    raise NanoError(f"{path} is neither a .litertlm (magic {MAGIC.decode()}) nor a .tflite (identifier "
                    f"{TFLITE_IDENTIFIER.decode()}): it starts {bytes(data[:8])!r}")


def _mapped(path: Path) -> memoryview:
    """The file's bytes, mapped read-only. Never closed explicitly: numpy views of an unpacked flatbuffer may
    outlive the check (in an exception's traceback), and the mapping goes with the last of them."""
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


# ---------------------------------------------------------------- the .litertlm container


def _check_litertlm(path: Path, data: memoryview) -> ArtifactSummary:
    from litert_lm_builder import litertlm_header_schema_py_generated as lm

    size, where = len(data), str(path)
    if size < HEADER_BEGIN:
        raise NanoError(f"{where}: {size} bytes is shorter than the {HEADER_BEGIN}-byte .litertlm preamble: truncated")
    major, minor, patch = struct.unpack_from("<III", data, 8)
    if major != MAJOR_VERSION:
        raise NanoError(f"{where}: .litertlm format version {major}.{minor}.{patch}; the engine reads "
                        f"{MAJOR_VERSION}.x")
    (header_end,) = struct.unpack_from("<Q", data, HEADER_END_AT)
    if not HEADER_BEGIN < header_end <= size:
        raise NanoError(f"{where}: the header ends at byte {header_end:,}, outside the file ({size:,} bytes): "
                        f"{'truncated' if header_end > size else 'damaged'}")
    if header_end > ENGINE_HEADER_MAX:
        raise NanoError(f"{where}: the header ends at byte {header_end:,}, past the {ENGINE_HEADER_MAX:,} bytes the "
                        "LiteRT-LM engine reads: it would not load (too much metadata)")
    with _checked(f"{where}: the header"):
        objects, provenance = _read_header(lm, bytes(data[HEADER_BEGIN:header_end]))
    names = {v: k for k, v in vars(lm.AnySectionDataType).items() if not k.startswith("_")}
    if not objects:
        raise NanoError(f"{where}: the header lists no sections")
    summary = ArtifactSummary(where, "litertlm", size, f"{major}.{minor}.{patch}")
    spans = []
    for i, section in enumerate(objects):
        kind = names.get(section.type)
        if kind is None:
            raise NanoError(f"{where}: section {i} has unknown type {section.type}")
        name = f"section {i} ({kind})"
        begin, end = section.begin, section.end
        if end > size:
            raise NanoError(f"{where}: {name} ends at byte {end:,}, past the end of the file ({size:,} bytes): "
                            "the file is truncated")
        if not header_end <= begin < end:
            raise NanoError(f"{where}: {name} spans bytes {begin:,}..{end:,}, which is empty or inside the header")
        spans.append((begin, end, name))
        summary.sections.append(kind)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise NanoError(f"{where}: {first} and {second} overlap")
    for i, section in enumerate(objects):
        if summary.sections[i] == TFLITE_SECTION:
            _check_tflite(data[section.begin:section.end], f"{where}: section {i} ({TFLITE_SECTION})", summary)
    digests = provenance.get(DIGESTS)
    if digests:
        _check_digests(data, objects, summary, digests)
    return summary


@dataclasses.dataclass
class _Section:
    type: int
    begin: int
    end: int


def _read_header(lm, header: bytes) -> tuple[list[_Section], dict]:
    """(sections, nano.* provenance) from the header flatbuffer, reading every section's items and every metadata
    entry (the object API of this generated schema cannot: it calls an undefined `VDataCreator`)."""
    root = lm.LiteRTLMMetaData.GetRootAs(header, 0)
    sections, provenance = [], {}
    table = root.SectionMetadata()
    for i in range(table.ObjectsLength() if table else 0):
        section = table.Objects(i)
        for j in range(section.ItemsLength()):
            _key_value(lm, section.Items(j))
        sections.append(_Section(section.DataType(), section.BeginOffset(), section.EndOffset()))
    system = root.SystemMetadata()
    for i in range(system.EntriesLength() if system else 0):
        key, value = _key_value(lm, system.Entries(i))
        if key.startswith("nano.") and isinstance(value, bytes):
            value = value.decode(errors="replace")
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
            provenance[key[len("nano."):]] = value
    return sections, provenance


def _key_value(lm, pair) -> tuple[str, object]:
    names = {v: k for k, v in vars(lm.VData).items() if not k.startswith("_")}
    key, table, kind = (pair.Key() or b"").decode(errors="replace"), pair.Value(), names.get(pair.ValueType(), "NONE")
    if table is None or kind == "NONE":
        return key, None
    value = getattr(lm, kind)()
    value.Init(table.Bytes, table.Pos)
    return key, value.Value()


# ---------------------------------------------------------------- TFLite flatbuffers


def _check_tflite(data: memoryview, where: str, summary: ArtifactSummary) -> None:
    from ai_edge_litert import schema_py_generated as schema

    if data[4:8] != TFLITE_IDENTIFIER:
        raise NanoError(f"{where} is not a TFLite flatbuffer (identifier {bytes(data[4:8])!r}, not "
                        f"{TFLITE_IDENTIFIER!r})")
    with _checked(where):
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    buffers, size = model.buffers or [], len(data)
    for i, buffer in enumerate(buffers):
        if buffer.offset > 1 and buffer.offset + buffer.size > size:  # offset 1 is the writers' "none" placeholder
            raise NanoError(f"{where}: buffer {i} (bytes {buffer.offset:,}..{buffer.offset + buffer.size:,}) lies "
                            f"past the end of the model ({size:,} bytes): truncated")
    opcodes = len(model.operatorCodes or [])
    for g, graph in enumerate(model.subgraphs or []):
        tensors = graph.tensors or []
        for t, tensor in enumerate(tensors):
            if not 0 <= tensor.buffer < len(buffers):
                raise NanoError(f"{where}: tensor {_name(tensor, t)} uses buffer {tensor.buffer}, which does not "
                                f"exist ({len(buffers)} buffers)")
            _check_tensor_bytes(tensor, t, buffers[tensor.buffer], types, where)
        indices = [*(graph.inputs if graph.inputs is not None else []),
                   *(graph.outputs if graph.outputs is not None else [])]
        for o, op in enumerate(graph.operators or []):
            if not 0 <= op.opcodeIndex < opcodes:
                raise NanoError(f"{where}: subgraph {g} operator {o} has opcode {op.opcodeIndex} of {opcodes}")
            for part in (op.inputs, op.outputs, op.intermediates):
                indices += [int(i) for i in (part if part is not None else []) if i != -1]  # -1: optional input
            if op.largeCustomOptionsOffset > 1 and op.largeCustomOptionsOffset + op.largeCustomOptionsSize > size:
                raise NanoError(f"{where}: subgraph {g} operator {o}'s options lie past the end of the model")
        bad = [int(i) for i in indices if not 0 <= i < len(tensors)]
        if bad:
            raise NanoError(f"{where}: subgraph {g} refers to tensor {bad[0]}, which does not exist "
                            f"({len(tensors)} tensors)")
    for signature in model.signatureDefs or []:
        key = signature.signatureKey.decode(errors="replace") if signature.signatureKey else "?"
        if not 0 <= signature.subgraphIndex < len(model.subgraphs or []):
            raise NanoError(f"{where}: signature {key} runs subgraph {signature.subgraphIndex}, which does not exist")
        tensors = len(model.subgraphs[signature.subgraphIndex].tensors or [])
        for item in [*(signature.inputs or []), *(signature.outputs or [])]:
            if not 0 <= item.tensorIndex < tensors:
                raise NanoError(f"{where}: signature {key} names tensor {item.tensorIndex}, which does not exist")
        summary.signatures.append(key)
    summary.buffers += len(buffers)


def _name(tensor, index: int) -> str:
    return f"{index} ({tensor.name.decode(errors='replace')!r})" if tensor.name else str(index)


def _check_tensor_bytes(tensor, index: int, buffer, types: dict, where: str) -> None:
    """A constant tensor's buffer holds at least the bytes its shape and type need (a kernel would read past it)."""
    stored = len(buffer.data) if buffer.data is not None and len(buffer.data) else (
        buffer.size if buffer.offset > 1 else 0)
    bits = _BITS.get(types.get(tensor.type, ""))
    shape = [int(d) for d in (tensor.shape if tensor.shape is not None else [])]
    if not stored or bits is None or any(d < 0 for d in shape):
        return  # an activation, or a type whose size is not fixed
    need = math.ceil(math.prod(shape) * bits / 8)
    if stored < need:
        raise NanoError(f"{where}: tensor {_name(tensor, index)} needs {need:,} bytes, its buffer holds {stored:,}")


# ---------------------------------------------------------------- digests


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


# The section's full SHA-256 is the check; a buffer's digest only names the weight that changed, so 64 bits do.
# Whole ones (~27 kB for the teacher's 362 buffers) made a header the LiteRT-LM engine refuses ("Failed to read
# header data"): it reads at most 16 KiB of header.
BUFFER_DIGEST_HEX = 16


def buffer_digests(tflite: memoryview) -> dict[str, str]:
    """{buffer index: SHA-256's first BUFFER_DIGEST_HEX hex digits} of every TFLite buffer stored after the flatbuffer (the weights), by (offset, size).
    `tflite` must already have passed _check_tflite (its buffer table is read without checks here)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    out = {}
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.Offset() > 1 and buffer.Size():
            out[str(i)] = sha256(tflite[buffer.Offset():buffer.Offset() + buffer.Size()])[:BUFFER_DIGEST_HEX]
    return out


def file_digests(sections: dict[str, Path]) -> dict:
    """The provenance record `export.bundle` writes: {"algorithm", "sections": {type: SHA-256 of the file that
    becomes that section}, "tflite_buffers": {buffer index: SHA-256}} (sections keyed by their LiteRT-LM type name;
    a bundle holds one of each). The TFLite file is checked first: a digest of a broken model proves nothing."""
    out = {"algorithm": "sha256", "sections": {}, "tflite_buffers": {}}
    for kind, file in sections.items():
        with open(file, "rb") as f:
            out["sections"][kind] = hashlib.file_digest(f, "sha256").hexdigest()
    if TFLITE_SECTION in sections:
        check_artifact(sections[TFLITE_SECTION])
        out["tflite_buffers"] = buffer_digests(_mapped(sections[TFLITE_SECTION]))
    return out


def _check_digests(data: memoryview, objects, summary: ArtifactSummary, digests) -> None:
    where = summary.path
    recorded = digests.get("sections") if isinstance(digests, dict) else None
    if not isinstance(recorded, dict) or not isinstance(digests.get("tflite_buffers", {}), dict):
        raise NanoError(f"{where}: the digests recorded in its provenance are damaged")
    for i, section in enumerate(objects):
        kind = summary.sections[i]
        if kind not in recorded:
            raise NanoError(f"{where}: section {i} ({kind}) has no recorded digest: it was not in the exported bundle")
        body = data[section.begin:section.end]
        if sha256(body) == recorded[kind]:
            summary.digests_checked += 1
            continue
        detail = ""
        if kind == TFLITE_SECTION:
            found, want = buffer_digests(body), digests.get("tflite_buffers", {})
            changed = sorted((int(k) for k in want if found.get(k) != want[k]))
            names = _buffer_names(body)
            detail = (f": {len(changed)} of {len(want)} weights changed, first buffer {changed[0]} "
                      f"({names.get(changed[0], '?')})" if changed else ": the flatbuffer (not a weight) changed")
        raise NanoError(f"{where}: digest mismatch in section {i} ({kind}){detail}; the file is not the one that was "
                        "exported and verified")


def _buffer_names(tflite: memoryview) -> dict[int, str]:
    """{buffer index: the name of a tensor stored in it}, to name a damaged weight (a checked model only)."""
    from ai_edge_litert import schema_py_generated as schema

    model, names = schema.Model.GetRootAs(tflite, 0), {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            names.setdefault(tensor.Buffer(), (tensor.Name() or b"").decode(errors="replace"))
    return names
