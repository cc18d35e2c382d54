"""Reading compressed models back: inspect and decompress."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_codebook as oc
from onnx_codebook.analysis import decompress_model, find_decoders, inspect_model
from onnx_codebook.schema import METADATA_KEY

from conftest import conv_transpose_model, feeds_for, gemm_model, run, shared_weight_model, small_cnn


def compressed(model, **options):
    options.setdefault("min_elements", 0)
    return oc.compress_with_report(model, **options)


def test_inspect_plain_model(rng):
    info = inspect_model(small_cnn(rng))
    assert info["compressed_layers"] == 0
    assert [r["format"] for r in info["layers"]] == ["float"] * 3
    assert info["weight_bytes_fp32"] == info["weight_bytes_stored"] == 4 * (144 + 4608 + 320)
    assert info["compression_ratio"] == 1.0


@pytest.mark.parametrize("granularity, bits", [("tensor", 2), ("channel", 4), ("group", 6)])
def test_inspect_compressed_model(rng, granularity, bits):
    model = small_cnn(rng)
    result = compressed(model, bits=bits, granularity=granularity, group_size=4, min_elements=200)
    info = inspect_model(result.model)
    rows = {r["name"]: r for r in info["layers"]}
    assert set(rows) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert info["compressed_layers"] == len(result.layers) == 2
    assert rows["conv1.weight"]["format"] == "float"
    for layer in result.layers:
        row = rows[layer.name]
        assert (row["op"], tuple(row["shape"]), row["bits"]) == (layer.op, layer.shape, bits)
        assert row["granularity"] == layer.granularity
        assert row["codebook_entries"] == layer.codebook_entries
        assert row["bytes_stored"] == layer.bytes_stored  # codebook and offsets included
        assert row["bytes_fp32"] == layer.bytes_fp32
    assert info["weight_bytes_fp32"] == info["weight_bytes_original"] == 4 * (144 + 4608 + 320)
    assert info["weight_bytes_stored"] == 4 * 144 + sum(l.bytes_stored for l in result.layers)
    assert info["compression_ratio"] == pytest.approx(info["weight_bytes_fp32"] / info["weight_bytes_stored"])


@pytest.mark.parametrize("fmt", ["standard", "fused"])
def test_inspect_counts_a_float16_weight_at_its_stored_size(fmt, require_ops):
    # a float16 weight read through Cast: inspect's original size is 2 bytes per value,
    # as compress reported it, and both ratios agree
    from onnx import TensorProto, helper

    from conftest import init, make_model

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float16)
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [("X", [1, 16, 8, 8])], [("Y", [1, 32, 8, 8])], [init("W16", w)])
    with pytest.warns(Warning, match="read through Cast"):
        result = compressed(model, bits=4, format=fmt, min_elements=0)
    (row,) = inspect_model(result.model)["layers"]
    (layer,) = result.layers
    assert row["bytes_original"] == layer.bytes_original == w.size * 2 and row["bytes_fp32"] == w.size * 4
    assert inspect_model(result.model)["compression_ratio"] == pytest.approx(layer.ratio)


def test_inspect_without_metadata(rng):
    """The graph itself is enough: strip the metadata and the layers are still found."""
    out = compressed(small_cnn(rng), bits=4).model
    del out.metadata_props[:]
    info = inspect_model(out)
    assert info["compressed_layers"] == 3
    assert all(r["bits"] == 4 for r in info["layers"])


def test_shared_weight_counted_once(rng):
    out = compressed(shared_weight_model(rng), bits=4).model
    info = inspect_model(out)
    assert info["compressed_layers"] == 1 and len(info["layers"]) == 1


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 1, "granularity": "tensor"},
                                     {"bits": 3, "codebook_dtype": "float16"}, {"bits": 8, "granularity": "group"}])
def test_decompress_gives_the_compressed_outputs(rng, options):
    model = small_cnn(rng)
    out = compressed(model, **options).model
    plain = decompress_model(out)
    onnx.checker.check_model(plain, full_check=True)
    assert find_decoders(plain) == []
    assert {t.name for t in plain.graph.initializer} == {t.name for t in model.graph.initializer}
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in plain.graph.initializer)
    assert not any(p.key == METADATA_KEY for p in plain.metadata_props)
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in model.graph.node]
    feeds = feeds_for(model, rng, 5)
    np.testing.assert_array_equal(run(plain, feeds)[0], run(out, feeds)[0])
    # Decompressing a plain model changes nothing.
    assert decompress_model(plain).graph == plain.graph


@pytest.mark.parametrize("builder", [conv_transpose_model, lambda rng: gemm_model(rng, trans_b=0), shared_weight_model])
def test_decompress_other_ops(rng, builder):
    model = builder(rng)
    out = compressed(model, bits=3, granularity="channel").model
    plain = decompress_model(out)
    onnx.checker.check_model(plain, full_check=True)
    feeds = feeds_for(model, rng)
    np.testing.assert_array_equal(run(plain, feeds)[0], run(out, feeds)[0])


def test_public_api_paths(rng, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(compressed(small_cnn(rng), bits=4).model, str(path))
    assert oc.inspect(str(path))["compressed_layers"] == 3
    assert find_decoders(oc.decompress(path)) == []
