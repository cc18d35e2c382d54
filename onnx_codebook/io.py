"""Loading and saving models: the only module that touches model files.

Saves are atomic: everything is written into a temporary folder beside the
target and renamed into place, so a failure never leaves a partial or
overwritten output.  Models whose tensors exceed protobuf's 2 GB limit are saved
with their tensors in ``<name>.data`` next to the model (external data).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError

# Above this many tensor bytes a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(source: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Load a model (with its external data) from a path, or pass a ModelProto through."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(e)})") from e
    except Exception as e:  # protobuf raises assorted errors on garbage input
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node and not model.graph.initializer:
        raise ModelLoadError(f"{path}: not an ONNX model (empty or truncated graph)")
    if not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no opset import)")
    return model


def iter_tensors(graph: onnx.GraphProto):
    """Every initializer and Constant-node tensor of the graph and its subgraphs."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers and Constant-node tensors, subgraphs included."""
    return sum(len(t.raw_data) or _typed_size(t) for t in iter_tensors(model.graph))


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes a model takes on disk: its file plus the external-data files its tensors name."""
    path = Path(path)
    size = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: load_model reports it
        return size
    locations = {e.value for t in iter_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    for location in locations:
        data = path.parent / location
        if data.is_file():
            size += data.stat().st_size
    return size


def _typed_size(t: onnx.TensorProto) -> int:
    fields = (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data)
    return sum(len(f) * (8 if f in (t.int64_data, t.double_data, t.uint64_data) else 4) for f in fields)


def iter_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph below it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def check_output_path(out: str | os.PathLike, *, inputs: tuple = (), force: bool = False) -> Path:
    """Fail early (before any work) when ``out`` cannot or must not be written."""
    out = Path(out)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            if not force:
                raise OutputError(f"{out}: output is the input model; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name for the output")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output folder is not writable")
    return out


def save_model(model: onnx.ModelProto, out: str | os.PathLike) -> int:
    """Write ``model`` to ``out`` atomically; returns the bytes written (model + data)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise OutputError(f"{parent}: cannot write there ({e.strerror})") from e
    try:
        tmp_model = tmpdir / out.name
        if external:
            # onnx moves the tensors of the model it saves to external data in place: save a copy
            # so that the caller's model keeps its tensors.
            model = _copy(model)
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_model))
        written = tmp_model.stat().st_size
        if external:
            written += (tmpdir / data_name).stat().st_size
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, out)
        return written
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({e.strerror})") from e
    except ValueError as e:
        raise OutputError(f"{out}: cannot serialise the model ({_first_line(e)})") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
