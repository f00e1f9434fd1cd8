"""Reading and writing ONNX models without holding their weights in memory.

Load: the protobuf only (external tensors stay references to their files); weights are read on demand, a few
rows at a time, through memory maps. Save: tensors stream into one external data file (copied with
copy_file_range where they are unchanged, produced chunk by chunk where the rewrite made them), the model is
verified (onnx.checker, an onnxruntime session), and only then renamed into place.
"""
from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import shutil
import stat
import sys
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.serialization import registry

from passes.support.errors import UserError, fail
from passes.support.outputs import Staging

PROTOBUF_LIMIT = 1_800_000_000     # write external data above this many bytes of tensors (protobuf caps at 2 GiB)
INLINE_BYTES = 1024                # tensors smaller than this stay inside the protobuf
ALIGN = 4096                       # external tensors start on page boundaries, so onnxruntime can mmap them
_PAGE = mmap.ALLOCATIONGRANULARITY    # onnxruntime maps external data only at offsets of this
CHUNK_BYTES = 64 << 20             # rows per chunk when tensors are produced piecewise
PROGRESS_BYTES = 256 << 20         # writing more than this shows a progress bar (on a terminal)


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def external_files(self) -> set[Path]:
        """The resolved data files of every external tensor (checked when the model was loaded)."""
        return {external_ref(t, self.base_dir).path for t, _ in all_tensors(self.proto) if _is_external(t)}


@dataclass
class NewTensor:
    """A tensor made by a pass, produced as row-major chunks (each [rows, ...]) so it is never whole in memory."""
    name: str
    dims: tuple[int, ...]
    data_type: int
    chunks: Callable[[], Iterator[np.ndarray]]

    def materialize(self) -> np.ndarray:
        parts = list(self.chunks())
        return np.concatenate(parts, axis=0).reshape(self.dims)


@dataclass
class ModelOutput:
    """A model to write: `proto` may contain placeholder initializers (no data) named in `new_tensors`;
    other external initializers refer to files under `source_dir`."""
    proto: onnx.ModelProto
    source_dir: Path
    new_tensors: dict[str, NewTensor] = field(default_factory=dict)


# ---------------------------------------------------------------- loading

def load_model(path: str | os.PathLike, *, weights_in_place: bool = False) -> LoadedModel:
    """The graph of an ONNX file, weights left on disk; bad files, and external data that `external_ref` refuses
    for any tensor of the model, are a UserError (so nothing downstream, onnxruntime or TensorRT included, ever
    reads a file outside the model's folder).

    weights_in_place=True, for tools that only read the model: inline initializers of LIFT_BYTES or more are not
    read either but become external data in the model file itself, at their offset (`_inline_in_place`); a
    model written from such a proto would carry external data, so tools that write models leave it False."""
    path = Path(path)
    if not path.exists():
        fail(f"{path}: no such file")
    if not path.is_file():
        fail(f"{path}: not a file")
    try:
        proto = (weights_in_place and _inline_in_place(path)) or onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        fail(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'})")
    if not proto.graph.node:
        fail(f"{path}: not an ONNX model (no graph nodes; truncated or a different file type?)")
    if not any(o.domain in ("", "ai.onnx") for o in proto.opset_import):
        fail(f"{path}: incomplete ONNX model (no opset_import for the default domain; truncated?)")
    model = LoadedModel(proto, path)
    for tensor, where in all_tensors(proto):
        if _is_external(tensor):
            external_ref(tensor, model.base_dir, f"{path}: {where}")
    return model


# protobuf: wire type of length-delimited fields; field numbers of ModelProto.graph, GraphProto.initializer,
# TensorProto.raw_data, and of the TensorProto fields that, present, leave a tensor inline (typed data, external
# data, data location)
_LEN, _GRAPH, _INITIALIZER, _RAW_DATA = 2, 7, 5, 9
_KEEP_INLINE = {3, 4, 5, 6, 7, 10, 11, 13, 14}      # segment, typed data, external data, data location


def _inline_in_place(path: Path) -> onnx.ModelProto | None:
    """The model at `path` parsed without the raw_data of its main graph's initializers of LIFT_BYTES or more,
    each of which becomes external data in `path` itself (location its file name, offset where its bytes lie);
    everything else parses as onnx.load parses it. None (the caller parses the file whole) where the file is a
    symbolic link, named as a text format (.json, .txtpb, ...), cannot be mapped or is not well-formed protobuf
    (onnx.load then says so).

    Parsing the 510 MB inline SmolLM2 took 0.7 s of its 3.7 s analysis on an H200; its sessions now read each
    segment's weights from the page cache, on the thread that opens them."""
    if (os.path.islink(path) or sys.byteorder != "little"
            or registry.get_format_from_file_extension(path.suffix) not in (None, "protobuf")):
        return None
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            model_rest, graph_rest, initializers = [], [], []
            for number, wire, start, payload, end in _wire_fields(data, 0, len(data)):
                if number != _GRAPH or wire != _LEN:
                    model_rest.append(data[start:end])
                    continue
                for n, w, s, p, e in _wire_fields(data, payload, end):
                    if n == _INITIALIZER and w == _LEN:
                        initializers.append(_tensor_in_place(data, p, e, path.name))
                    else:
                        graph_rest.append(data[s:e])
        proto = onnx.ModelProto.FromString(b"".join(model_rest))
        proto.graph.MergeFromString(b"".join(graph_rest))
    except Exception:      # ValueError / IndexError from the scan, protobuf's DecodeError, an unmappable file
        return None
    proto.graph.initializer.extend(initializers)
    return proto


def _tensor_in_place(data, start: int, end: int, location: str) -> TensorProto:
    """The TensorProto serialized at data[start:end]: one of LIFT_BYTES or more held as raw_data (and nothing
    else that holds or places its values) without its bytes, as external data at `location` where they lie."""
    if end - start < LIFT_BYTES:
        return TensorProto.FromString(data[start:end])
    fields = []
    for wire_field in _wire_fields(data, start, end):
        if wire_field[0] in _KEEP_INLINE:
            return TensorProto.FromString(data[start:end])
        fields.append(wire_field)
    raw = [(p, e) for n, w, _, p, e in fields if n == _RAW_DATA and w == _LEN]
    if not raw or raw[-1][1] - raw[-1][0] < LIFT_BYTES:
        return TensorProto.FromString(data[start:end])
    tensor = TensorProto.FromString(b"".join(data[s:e] for n, w, s, _, e in fields if (n, w) != (_RAW_DATA, _LEN)))
    offset, stop = raw[-1]                    # the last raw_data is the one protobuf keeps
    try:                                      # the size external_ref will hold it to (no negative dimension)
        sized = tensor.data_type not in _PACKED and _expected_bytes(tensor, tensor.name) == stop - offset
    except UserError:                         # a type without a fixed element size
        sized = False
    if not sized:                             # left to the checks that inline tensors get
        return TensorProto.FromString(data[start:end])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(stop - offset))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _wire_fields(data, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its payload, end of the field) of each field of the
    protobuf message serialized at data[start:end]; ValueError where it is not well-formed (groups included)."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        payload = pos
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == _LEN:
            length, payload = _varint(data, pos)
            pos = payload + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if number == 0 or pos > end:
            raise ValueError("truncated or corrupt")
        yield number, wire, field_start, payload, pos


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint too long")


def all_tensors(model: onnx.ModelProto):
    """(TensorProto, where) for every tensor stored in the model: initializers, sparse initializers, tensor
    attributes of nodes (Constant values and others), in the main graph, in subgraphs and in functions."""
    def graph_tensors(graph: onnx.GraphProto, scope: str):
        for tensor in graph.initializer:
            yield tensor, f"{scope}initializer '{tensor.name}'"
        for sparse in graph.sparse_initializer:
            yield sparse.values, f"{scope}sparse initializer '{sparse.values.name}'"
            yield sparse.indices, f"{scope}sparse initializer '{sparse.values.name}' (indices)"
        yield from node_tensors(graph.node, scope)

    def node_tensors(nodes, scope: str):
        for node in nodes:
            label = f"{scope}node '{node.name or node.op_type}'"
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t, f"{label} attribute '{attr.name}'"
                for tensor in attr.tensors:
                    yield tensor, f"{label} attribute '{attr.name}'"
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values, f"{label} attribute '{attr.name}'"
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g, f"{label} subgraph: ")
                for sub in attr.graphs:
                    yield from graph_tensors(sub, f"{label} subgraph: ")

    yield from graph_tensors(model.graph, "")
    for function in model.functions:
        yield from node_tensors(function.node, f"function '{function.name}' ")


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: a regular file inside the model's folder, read at [offset, offset +
    length), length = the tensor's size from its shape and type."""
    path: Path
    offset: int
    length: int


def external_ref(tensor: TensorProto, base_dir: Path, where: str | None = None) -> ExternalRef:
    """The one place that resolves external data, for every tool. Refused (UserError naming the tensor): a
    location that is empty, absolute, a symbolic link, or that leaves the model's folder once `..` and linked
    folders are resolved; a data file that is missing, or not a regular file (a folder, device, fifo, socket);
    duplicate keys; an offset or length that is not a plain non-negative integer; a length that does not match
    the tensor's shape and type; a range that ends past the end of the file. Nothing is read or mapped here."""
    where = where or f"tensor '{tensor.name}'"
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            fail(f"{where}: external data has the key '{entry.key}' twice")
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if not location or "\0" in location:
        fail(f"{where}: external data has no location")
    if os.path.isabs(location) or PureWindowsPath(location).anchor or location.startswith(("/", "\\")):
        fail(f"{where}: external data location '{location}' is an absolute path; it must be relative to the model's folder")
    base = Path(os.path.realpath(base_dir))
    candidate = Path(base_dir) / location
    if os.path.islink(candidate):
        fail(f"{where}: external data location '{location}' is a symbolic link; it must be a regular file in the model's folder")
    resolved = Path(os.path.realpath(candidate))
    if resolved == base or not resolved.is_relative_to(base):
        fail(f"{where}: external data location '{location}' leaves the model's folder ({resolved} is outside {base})")
    try:
        info = os.stat(resolved)
    except OSError:
        fail(f"{where}: external data file '{location}' is missing")
    if not stat.S_ISREG(info.st_mode):
        fail(f"{where}: external data '{location}' is not a regular file (a folder, device, fifo or socket)")
    offset, length = (_non_negative(entries, key, where) for key in ("offset", "length"))
    expected = _expected_bytes(tensor, where)
    if length is not None and length != expected:
        fail(f"{where}: external data length {length} does not match its shape {list(tensor.dims)} and type "
             f"{TensorProto.DataType.Name(tensor.data_type)} ({expected} bytes)")
    offset = offset or 0
    if offset + expected > info.st_size:
        fail(f"{where}: external data '{location}' ends past the end of the file (offset {offset} + {expected} bytes > "
             f"{info.st_size} bytes)")
    return ExternalRef(resolved, offset, expected)


def _non_negative(entries: dict[str, str], key: str, where: str) -> int | None:
    if key not in entries:
        return None
    text = entries[key]
    if not (text.isascii() and text.isdigit()):
        fail(f"{where}: external data {key} '{text}' is not a non-negative integer")
    return int(text)


def _expected_bytes(tensor: TensorProto, where: str) -> int:
    try:
        itemsize = np_dtype(tensor.data_type).itemsize
    except Exception:
        itemsize = 0
    if not itemsize or tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        fail(f"{where}: external data of type {TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in TensorProto.DataType.values() else tensor.data_type} is not supported")
    if any(d < 0 for d in tensor.dims):
        fail(f"{where}: negative dimension in shape {list(tensor.dims)}")
    return int(np.prod(tensor.dims, dtype=object)) * itemsize if tensor.dims else itemsize


@functools.cache
def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def tensor_nbytes(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * np_dtype(tensor.data_type).itemsize


def tensor_array(tensor: TensorProto, base_dir: Path, mmap: bool = True) -> np.ndarray:
    """The values of an initializer; external tensors come back memory-mapped (read lazily, read-only)."""
    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    ref = external_ref(tensor, base_dir)
    shape = tuple(tensor.dims)
    dtype = np_dtype(tensor.data_type)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    if mmap:
        return np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        return np.frombuffer(f.read(ref.length), dtype=dtype).reshape(shape)


def initializer_map(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


# ---------------------------------------------------------------- saving

def stage_model(output: ModelOutput, out_path: str | os.PathLike, staging: Staging, *, external: bool | None = None,
                protected: set[Path] = frozenset(), verify: bool = True, reference: Path | None = None,
                extra_files: dict[str, bytes | Path] | None = None) -> Path:
    """Write `output`, verified, into `staging` for out_path; returns the temporary model path (its data beside it).
    staging.publish() renames it into place, after whatever else the caller stages (a report measured on the
    model, say).

    external=None writes external data when the tensors exceed the protobuf limit or any input tensor was
    external. `protected` files (the input and its data) are never written. `reference` is the input model,
    used to tell a verification failure we caused from one the input already had. `extra_files` (name: bytes,
    or a file to copy) go beside the model.
    """
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    check_not_input(out_path, protected)
    if not out_path.parent.is_dir():
        fail(f"output folder {out_path.parent} does not exist")
    proto = onnx.ModelProto()
    proto.CopyFrom(output.proto)
    total = sum(_output_nbytes(t, output) for t in proto.graph.initializer)
    if external is None:
        external = total > PROTOBUF_LIMIT or any(_is_external(t) for t in output.proto.graph.initializer)
    external = external or total > PROTOBUF_LIMIT

    tmp_dir = staging.folder(out_path)
    tmp_model = tmp_dir / out_path.name
    if external:
        _write_external(proto, output, tmp_dir / data_name, data_name, total)
    else:
        _inline_all(proto, output)
    with open(tmp_model, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
    extras = {name: content for name, content in (extra_files or {}).items() if name not in (out_path.name, data_name)}
    for name, content in extras.items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp_dir / name)
        else:
            (tmp_dir / name).write_bytes(content)
    if verify:
        verify_model(tmp_model, reference)
    if external:
        staging.add(tmp_dir / data_name, out_path.with_name(data_name))
    for name in extras:
        staging.add(tmp_dir / name, out_path.with_name(name))
    staging.add(tmp_model, out_path)
    return tmp_model


def save_model(output: ModelOutput, out_path: str | os.PathLike, **options) -> Path:
    """Write `output` to out_path atomically (stage_model, then publish at once); returns out_path."""
    with Staging() as staging:
        stage_model(output, out_path, staging, **options)
        staging.publish()
    return Path(out_path)


def check_not_input(out_path: Path, protected) -> None:
    """Refuse (UserError) an output whose model or data file (OUT.data) would be one of the `protected` files
    (an input model and its external data): the same path, a symbolic link to it, or a hard link of it."""
    out_path = Path(out_path)
    for target in (out_path, out_path.with_name(out_path.name + ".data")):
        if _aliases(target, protected):
            fail(f"output {target} would overwrite the input model or its external data (the same path, a link to it "
                 f"or a hard link of it); the input is never modified, choose another -o")


def _aliases(target: Path, protected) -> bool:
    """Whether writing `target` could touch a protected file: same resolved path, or the same file (hard link)."""
    resolved = target.resolve()
    for path in protected:
        path = Path(path)
        if resolved == path.resolve():
            return True
        try:
            if target.exists() and path.exists() and os.path.samefile(target, path):
                return True
        except OSError:
            continue
    return False


def _output_nbytes(tensor: TensorProto, output: ModelOutput) -> int:
    new = output.new_tensors.get(tensor.name)
    if new is not None:
        return int(np.prod(new.dims, dtype=np.int64)) * np_dtype(new.data_type).itemsize
    return tensor_nbytes(tensor)


def _inline_all(proto: onnx.ModelProto, output: ModelOutput) -> None:
    for tensor in proto.graph.initializer:
        new = output.new_tensors.get(tensor.name)
        if new is not None:
            tensor.CopyFrom(numpy_helper.from_array(new.materialize(), tensor.name))
        elif _is_external(tensor):
            array = np.ascontiguousarray(tensor_array(tensor, output.source_dir, mmap=False))
            tensor.ClearField("external_data")
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = array.tobytes()


def _write_external(proto: onnx.ModelProto, output: ModelOutput, data_path: Path, location: str, total: int) -> None:
    from tqdm import tqdm
    with open(data_path, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {location}",
                                            disable=None if total > PROGRESS_BYTES else True, leave=False) as bar:
        for tensor in proto.graph.initializer:
            new = output.new_tensors.get(tensor.name)
            nbytes = _output_nbytes(tensor, output)
            if new is None and nbytes < INLINE_BYTES:
                if _is_external(tensor):
                    array = np.ascontiguousarray(tensor_array(tensor, output.source_dir, mmap=False))
                    tensor.ClearField("external_data")
                    tensor.data_location = TensorProto.DEFAULT
                    tensor.raw_data = array.tobytes()
                continue
            offset = -dst.tell() % ALIGN + dst.tell()
            dst.write(b"\0" * (offset - dst.tell()))
            if new is not None:
                for chunk in new.chunks():
                    dst.write(np.ascontiguousarray(chunk, dtype=np_dtype(new.data_type)).tobytes())
            elif _is_external(tensor):
                ref = external_ref(tensor, output.source_dir)
                _copy_range(ref.path, ref.offset, nbytes, dst)
            else:
                dst.write(np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes())
            written = dst.tell() - offset
            bar.update(written)
            if written != nbytes:
                raise AssertionError(f"tensor {tensor.name}: wrote {written} bytes, expected {nbytes}")
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data", "external_data"):
                tensor.ClearField(name)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _copy_range(src: Path, offset: int, count: int, dst) -> None:
    """Copy count bytes at offset of src to the end of dst, in the kernel where possible."""
    dst.flush()
    with open(src, "rb") as f:
        remaining, pos = count, offset
        while remaining:
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), min(remaining, 1 << 30), pos)
            except (AttributeError, OSError):
                f.seek(pos)
                n = os.write(dst.fileno(), f.read(min(remaining, 1 << 24)))
            if n == 0:
                raise OSError(f"{src}: unexpected end of file")
            remaining -= n
            pos += n
    dst.seek(0, os.SEEK_END)


# ---------------------------------------------------------------- verification

PROVIDERS = ("auto", "cpu", "cuda")


def resolve_provider(provider: str | None) -> str:
    """"cpu" or "cuda" for a --provider choice: auto (or None) is cuda where this onnxruntime has the CUDA
    execution provider (onnxruntime-gpu on a machine with a GPU), else cpu; cuda without it is a UserError."""
    import onnxruntime as ort
    available = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider in (None, "auto"):
        return "cuda" if available else "cpu"
    if provider == "cuda" and not available:
        fail("--provider cuda: this onnxruntime has no CUDA execution provider (install onnxruntime-gpu on a machine "
             "with an NVIDIA GPU), or use --provider cpu")
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "cuda":
        _load_cuda_libraries()
    return provider


@functools.cache
def _load_cuda_libraries() -> str:
    """Loads the CUDA and cuDNN libraries onnxruntime-gpu links against from the nvidia-* pip packages
    (onnxruntime.preload_dlls: what `import torch` does for torch users; these passes never import torch).
    Returns what it reported, for the error when the CUDA provider still cannot start."""
    import onnxruntime as ort
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        getattr(ort, "preload_dlls", lambda: None)()
    return report.getvalue().strip()


def execution_providers(provider: str | None) -> list:
    """onnxruntime's providers list for "cpu" or "cuda" (CUDA first, CPU for the ops CUDA lacks)."""
    if resolve_provider(provider) == "cuda":
        # fp32 products in fp32 (onnxruntime's default, TF32, moves M by 2.5e-4); the arena grows by what is asked
        # for, not to the next power of two: segments of a 49B model come and go
        return [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# weights this big reach a session over their own bytes (an OrtValue each), not copied into its protobuf nor
# read by onnxruntime into a buffer of its own: inline ones (the prologue segment of the real SmolLM2, 121 MB of
# inline weights, was made and opened in 0.17 s, not 0.92 s) and external ones that onnxruntime could not map
# because their offset is not a multiple of the page size (a model loaded with its weights in place)
LIFT_BYTES = 1 << 20
LIFTED = "lifted-tensor"      # the external-data location of their placeholders (never a file)
_STORAGE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}     # itemsize -> dtype the bytes are viewed as
_PACKED = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, n)}


def placeholder(tensor: TensorProto) -> TensorProto:
    """`tensor` itself, or for a tensor of at least LIFT_BYTES held as raw_data or as external data at an offset
    that is not a multiple of the page size, a placeholder of its name, type and shape (external data at LIFTED)
    that ort_session fills from its `weights` (no protobuf copy, no read into a buffer)."""
    if _is_external(tensor):
        offset = {e.key: e.value for e in tensor.external_data}.get("offset", "0")
        if not offset.isdigit() or int(offset) % _PAGE == 0:
            return tensor
    elif not tensor.HasField("raw_data"):
        return tensor
    if sys.byteorder != "little" or tensor.data_type in (TensorProto.STRING, *_PACKED):
        return tensor
    try:
        itemsize = np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):      # not a type onnx knows: onnxruntime will say so
        return tensor
    if itemsize not in _STORAGE or tensor_nbytes(tensor) < LIFT_BYTES:
        return tensor
    lifted = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", LIFTED), ("offset", "0"), ("length", str(tensor_nbytes(tensor)))):
        entry = lifted.external_data.add()
        entry.key, entry.value = key, value
    return lifted


def _lifted_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer
            if _is_external(t) and any(e.key == "location" and e.value == LIFTED for e in t.external_data)]


def _over_bytes(tensor: TensorProto, base_dir: Path | None, host: bool):
    """An OrtValue over the bytes of a tensor (its element type and shape): an inline tensor's raw_data, an
    external one's memory-mapped file (tensor_array). host: the session computes on them where they
    lie (no CUDA provider to copy them to), so a map at an offset that does not align its elements (a tensor
    in place in a protobuf) is copied to memory that does."""
    import onnxruntime as ort
    storage = _STORAGE[np_dtype(tensor.data_type).itemsize]
    if _is_external(tensor):
        array = tensor_array(tensor, base_dir).view(storage)
        if host and not array.flags.aligned:
            array = np.array(array)
    else:
        raw = tensor.raw_data
        if len(raw) != tensor_nbytes(tensor):
            fail(f"initializer '{tensor.name}' holds {len(raw)} bytes; its shape {list(tensor.dims)} and type "
                 f"{TensorProto.DataType.Name(tensor.data_type)} need {tensor_nbytes(tensor)}")
        array = np.frombuffer(raw, storage).reshape(tuple(tensor.dims))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.data_type)


QUICK_SECONDS = 0.02       # runs that took less run on the calling thread (run_session)
SHARED_ARENA = {"session.use_env_allocators": "1"}     # session configuration: take memory from the shared arena


@functools.cache
def share_cuda_arena() -> bool:
    """Registers one CUDA memory arena for the whole process (once), growing by what is asked for; sessions made
    with SHARED_ARENA in their configuration take their activations and outputs from it. What a session's runs
    used goes back to this arena when it closes, for the next session, instead of dying with its own arena:
    the segment-major analysis of 40 Super-49B layers (48.2 GB) peaked at 20.9 GB with it, 31.0 GB without.
    False where this onnxruntime cannot register one: its sessions then keep an arena each, as before."""
    import onnxruntime as ort
    memory = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", memory, {"device_id": "0"},
                                             ort.OrtArenaCfg({"arena_extend_strategy": 1}))   # 1: kSameAsRequested
    except RuntimeError:
        return False
    return True


@functools.cache
def warm_cuda() -> futures.Future:
    """Opens and runs a tiny CUDA session on a thread of its own, once a process: what the first CUDA session and
    run pay (the CUDA execution provider's libraries, cuBLAS and cuDNN set up, a first GEMM) is then paid while
    the caller starts, not by its first real session (SmolLM2's analysis on an H200: 2.13-2.29 s against
    2.27-2.70 s, interleaved). The future holds the session's error, if any: the real sessions report theirs."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [576, 1536], np.ones(576 * 1536, np.float32).tobytes(), raw=True)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["z"], axis=-1)]
    graph = helper.make_graph(nodes, "warm_cuda", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 576])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def warm() -> None:
        session = ort_session(model, providers=execution_providers("cuda"))
        session.run(None, {"x": np.ones((64, 576), np.float32)})

    return futures.ThreadPoolExecutor(1, thread_name_prefix="cuda-warm-up").submit(warm)


def confined_cpus() -> int | None:
    """The CPUs this process may use when taskset or a container's cpuset gives it fewer than the machine has
    (onnxruntime's default thread count counts the machine's cores), else None."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return allowed if allowed and allowed < (os.cpu_count() or allowed) else None


def ort_session(model: Path | onnx.ModelProto, light: bool = False, providers: list | None = None,
                base_dir: Path | None = None, config: dict[str, str] | None = None,
                weights: dict[str, TensorProto] | None = None):
    """An onnxruntime session over a file, or over an in-memory graph whose external data lies in base_dir
    (providers: execution_providers(...); default the CPU).

    light=True skips graph optimizations and weight prepacking (a load check); `config`: more session
    configuration entries; `weights`: the tensors of the graph's placeholders (see `placeholder`) by name."""
    import onnxruntime as ort
    ort.set_default_logger_severity(3)   # errors only (onnxruntime-gpu 1.31 warns about plugin EPs at every session)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = confined_cpus() or 0
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if light:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    lifted = []
    wanted = {p[0] if isinstance(p, tuple) else p for p in providers or ()}
    if isinstance(model, onnx.ModelProto):
        names = [n for n in _lifted_names(model) if n in (weights or {})]
        if names:
            lifted = [_over_bytes(weights[name], base_dir, "CUDAExecutionProvider" not in wanted) for name in names]
            options.add_external_initializers(names, lifted)
        if base_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
        model = model.SerializeToString()
    else:
        model = str(model)
    session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
    session.lifted_weights = lifted       # onnxruntime's API asks that they outlive the session
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in session.get_providers():
        fail("onnxruntime could not start its CUDA execution provider (are the CUDA and cuDNN versions this "
             "onnxruntime-gpu was built for installed? "
             + (_load_cuda_libraries().splitlines() or ["no library was missing"])[0] + "); use --provider cpu")
    return session


def run_session(session, outputs: list[str] | None, feeds: dict | None, *, ort_values: bool = False, binding=None):
    """session.run (or run_with_ort_values, or with `binding`, an IOBinding whose inputs and outputs are bound,
    run_with_iobinding: then outputs and feeds are unused and the results are the binding's) in the runner thread,
    so that SIGINT / SIGTERM stop even a long run within a moment: the main thread waits, and on an interrupt
    sets RunOptions.terminate, which onnxruntime checks between nodes, then re-raises. A session whose last run
    took under QUICK_SECONDS runs on the calling thread instead: an interrupt then waits for the run's end, a few
    milliseconds, and the handoff between threads is saved (0.1 to 0.3 ms a run on an H200, where a small
    segment's whole run takes 0.4 to 0.75 ms and a reduction's 0.16 ms)."""
    import onnxruntime as ort
    options = ort.RunOptions()
    # onnxruntime's Python wrapper looks this entry up on every run, and raises and catches an error where it is
    # absent (45 us a run on 2 cores, more than a small run takes); -1 is "no CUDA graph", what every run here is
    options.add_run_config_entry("gpu_graph_id", "-1")
    if binding is not None:
        call, args = session.run_with_iobinding, (binding, options)
    else:
        call, args = session.run_with_ort_values if ort_values else session.run, (outputs, feeds, options)
    start = time.perf_counter()
    try:
        if getattr(session, "last_run_seconds", QUICK_SECONDS) < QUICK_SECONDS:
            return call(*args)
        done = _runner(os.getpid()).submit(call, *args)
        try:
            while not done.done():
                futures.wait([done], timeout=0.05)
        except KeyboardInterrupt:
            options.terminate = True
            futures.wait([done])
            raise
        return done.result()
    finally:
        session.last_run_seconds = time.perf_counter() - start


@functools.cache
def _runner(pid: int):
    """The one thread (of process `pid`: a forked child makes its own) every onnxruntime run goes through. One
    that lives, not one per run: a new thread for every run of the CUDA provider doubled the time of SmolLM2's
    analysis on an H200 (12.3 s against 5.8 s)."""
    return futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime-run")


def verify_model(path: Path, reference: Path | None = None) -> None:
    """onnx.checker and an onnxruntime load must pass, unless the reference (input) model fails them too."""
    for name, check in (("onnx.checker", lambda p: onnx.checker.check_model(str(p))),
                        ("onnxruntime", lambda p: ort_session(p, light=True))):
        try:
            check(path)
        except Exception as exc:
            if reference is not None:
                try:
                    check(reference)
                except Exception:
                    continue   # the input fails this check already; nothing we changed
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"the written model fails {name}: {message}") from exc
