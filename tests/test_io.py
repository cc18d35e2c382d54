"""Loading and saving: clear errors, atomic writes, external data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_codebook import io as oc_io
from onnx_codebook.errors import ModelLoadError, OutputError

from conftest import init, make_model, randn, small_cnn


def test_load_errors(tmp_path, cnn_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        oc_io.load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="folder"):
        oc_io.load_model(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not"):
        oc_io.load_model(text)
    truncated = tmp_path / "truncated.onnx"
    data = cnn_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        oc_io.load_model(truncated)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        oc_io.load_model(empty)


def test_load_passes_protos_through(rng):
    model = small_cnn(rng)
    assert oc_io.load_model(model) is model


def test_save_is_atomic_and_leaves_nothing_behind(rng, tmp_path):
    model = small_cnn(rng)
    out = tmp_path / "m.onnx"
    written = oc_io.save_model(model, out)
    assert written == out.stat().st_size
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert onnx.load(str(out)) == model


def test_failed_save_keeps_the_old_file_and_no_temp_files(rng, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old contents")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", fail)
    with pytest.raises(OutputError, match="No space left"):
        oc_io.save_model(small_cnn(rng), out)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert out.read_bytes() == b"old contents"


def test_external_data(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(oc_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    model = small_cnn(rng)
    before = model.SerializeToString()
    out = tmp_path / "m.onnx"
    written = oc_io.save_model(model, out)
    assert model.SerializeToString() == before  # the caller's model keeps its tensors
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert written == out.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert out.stat().st_size < 4096 < (tmp_path / "m.onnx.data").stat().st_size
    loaded = oc_io.load_model(out)
    assert {t.name: t.raw_data for t in loaded.graph.initializer} == {t.name: t.raw_data for t in model.graph.initializer}


def test_tensor_bytes_counts_constants_and_subgraphs(rng):
    w = randn(rng, 8, 8)
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=init("c", w))], "b", [],
                               [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [8, 8])])
    nodes = [helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch)]
    cond = helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    model = make_model(nodes, [cond], [("Y", [8, 8])], [init("u", w)])
    assert oc_io.tensor_bytes(model) == 3 * 256
    assert len(list(oc_io.iter_graphs(model.graph))) == 3


def test_check_output_path(tmp_path, cnn_path):
    fresh = tmp_path / "new.onnx"
    assert oc_io.check_output_path(fresh) == fresh
    with pytest.raises(OutputError, match="--force"):
        oc_io.check_output_path(cnn_path, inputs=(cnn_path,))
    assert oc_io.check_output_path(cnn_path, inputs=(cnn_path,), force=True) == cnn_path
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        oc_io.check_output_path(existing)
    with pytest.raises(OutputError, match="folder"):
        oc_io.check_output_path(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        oc_io.check_output_path(tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(OutputError, match="does not exist"):
        oc_io.check_output_path(existing / "m.onnx")  # parent is a file


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="not writable"):
        oc_io.check_output_path(locked / "m.onnx")
