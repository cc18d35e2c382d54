"""Which weights are eligible, and why the others are skipped."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import onnx_codebook as oc
from onnx_codebook.config import CompressConfig
from onnx_codebook.errors import CodebookWarning, NoEligibleLayerError
from onnx_codebook.pipeline import compress_model
from onnx_codebook.select import constants_to_initializers, select_layers

from conftest import (constant_node_model, conv_transpose_model, feeds_for, gemm_model, init, make_model, randn, run,
                      small_cnn, weights_listed_as_inputs)

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def select(model, min_elements=0, ops=OPS):
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    constants_to_initializers(proto, ops)
    return select_layers(gs.import_onnx(proto), ops, min_elements, {i.name for i in proto.graph.input})


def test_layers_and_channel_axes(rng):
    layers, skipped = select(small_cnn(rng))
    assert [(l.weight, l.op_type, l.axis, l.channels) for l in layers] == [
        ("conv1.weight", "Conv", 0, 16), ("conv2.weight", "Conv", 0, 32), ("fc.weight", "Gemm", 0, 10)]
    assert skipped == []
    assert [l.size for l in layers] == [144, 4608, 320]
    assert select(conv_transpose_model(rng))[0][0].axis == 1
    assert select(gemm_model(rng, trans_b=0))[0][0].axis == 1


def test_min_elements_and_ops(rng):
    layers, skipped = select(small_cnn(rng), min_elements=200)
    assert [l.weight for l in layers] == ["conv2.weight", "fc.weight"]
    assert [(s.name, s.op_type) for s in skipped] == [("conv1.weight", "Conv")]
    layers, _ = select(small_cnn(rng), ops=("Gemm",))
    assert [l.weight for l in layers] == ["fc.weight"]


def test_constant_nodes_become_initializers(rng):
    model = constant_node_model(rng)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    assert constants_to_initializers(proto, OPS) == 1
    assert [t.name for t in proto.graph.initializer] == ["W"]
    assert [n.op_type for n in proto.graph.node] == ["Conv"]
    onnx.checker.check_model(proto, full_check=True)
    # Only Constants feeding a weight input move: a Constant feeding Add stays.
    nodes = [helper.make_node("Constant", [], ["k"], value=init("k", np.ones(4, np.float32))),
             helper.make_node("Add", ["X", "k"], ["Y"])]
    other = make_model(nodes, [("X", [4])], [("Y", [4])])
    assert constants_to_initializers(other, OPS) == 0


def test_normalisation_held_in_constant_nodes_folds(rng):
    # Paddle exports hold the weight, the bias and BatchNormalization's parameters in
    # Constant nodes: all become initializers, so the normalisation folds into the weight.
    def const(name, array):
        return helper.make_node("Constant", [], [name], name=f"c_{name}", value=init(name, array))

    nodes = [const("W", randn(rng, 16, 8, 3, 3)), const("B", randn(rng, 16)),
             const("scale", rng.uniform(0.5, 1.5, 16).astype(np.float32)), const("shift", randn(rng, 16)),
             const("mean", randn(rng, 16)), const("var", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
             helper.make_node("Conv", ["X", "W", "B"], ["C"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["C", "scale", "shift", "mean", "var"], ["Y"], name="bn")]
    model = make_model(nodes, [("X", [1, 8, 6, 6])], [("Y", [1, 16, 6, 6])], opset=13)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    assert constants_to_initializers(proto, OPS) == 6
    out = oc.compress(model, bits=8, min_elements=0)
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    feeds = feeds_for(model, rng)
    got, want = run(out, feeds)[0], run(model, feeds)[0]
    np.testing.assert_allclose(got, want, atol=0.02 * float(np.abs(want).max()))


def test_an_already_quantized_model_says_so():
    # a model whose convolutions are ConvInteger (int8 weights) has nothing to cluster
    graph = helper.make_graph([helper.make_node("ConvInteger", ["X", "W"], ["Y"], name="conv")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 8, 4, 4])],
                              [init("W", np.ones((8, 4, 3, 3), np.uint8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(NoEligibleLayerError, match=r"already quantized \(1 ConvInteger\)"):
        compress_model(model, CompressConfig(min_elements=0))


def test_identity_is_looked_through_and_shared_weights_grouped(rng):
    nodes = [helper.make_node("Identity", ["W"], ["W2"], name="id"),
             helper.make_node("MatMul", ["A", "W2"], ["H"], name="mm1"),
             helper.make_node("MatMul", ["H", "W"], ["Y"], name="mm2")]
    model = make_model(nodes, [("A", [2, 16])], [("Y", [2, 16])], [init("W", randn(rng, 16, 16))])
    layers, _ = select(model)
    assert len(layers) == 1 and layers[0].node_names == ("mm1", "mm2")


def test_skip_reasons(rng):
    w = randn(rng, 16, 16)
    nodes = [helper.make_node("MatMul", ["A", "B"], ["H"], name="dynamic"),        # run-time RHS
             helper.make_node("MatMul", ["C", "A"], ["H2"], name="const_lhs"),     # constant LHS
             helper.make_node("Add", ["H", "H2"], ["Y"], name="add")]
    model = make_model(nodes, [("A", [16, 16]), ("B", [16, 16])], [("Y", [16, 16])], [init("C", w)])
    layers, skipped = select(model)
    assert layers == []
    reasons = {s.name: s.reason for s in skipped}
    assert "run time" in reasons["dynamic"]
    assert "left-hand side" in reasons["const_lhs"]


def test_weight_that_is_also_a_graph_input_is_skipped_and_kept_in_the_interface(rng):
    nodes = [helper.make_node("MatMul", ["A", "G"], ["Y"], name="mm"),
             helper.make_node("MatMul", ["Y", "W"], ["Z"], name="mm2")]
    g_in = helper.make_tensor_value_info("G", TensorProto.FLOAT, [16, 16])
    model = make_model(nodes, [("A", [2, 16]), g_in], [("Z", [2, 16])],
                       [init("G", randn(rng, 16, 16)), init("W", randn(rng, 16, 16))])
    layers, skipped = select(model)
    assert [l.weight for l in layers] == ["W"] and skipped[0].name == "G" and "graph input" in skipped[0].reason
    out = compress_model(model, CompressConfig(min_elements=0))
    assert [i.name for i in out.model.graph.input] == ["A", "G"]
    onnx.checker.check_model(out.model, full_check=True)


def test_ir3_weights_listed_as_inputs_are_compressed_like_unlisted_ones(rng):
    # IR 3 requires the listing, so it does not mark the weights as overridable
    model = small_cnn(rng, opset=8)
    old = weights_listed_as_inputs(model, ir_version=3)
    onnx.checker.check_model(old, full_check=True)
    assert select(old)[0] == [] and "graph input" in select(old)[1][0].reason  # what select alone sees
    config = CompressConfig(min_elements=0)
    with pytest.warns(CodebookWarning, match="IR version 3"):
        out = compress_model(old, config)
    ref = compress_model(model, config)
    assert [l.name for l in out.layers] == [l.name for l in ref.layers] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert [i.name for i in out.model.graph.input] == ["X"] and out.model.ir_version >= 4
    onnx.checker.check_model(out.model, full_check=True)
    feeds = feeds_for(model, rng)
    np.testing.assert_array_equal(run(out.model, feeds)[0], run(ref.model, feeds)[0])
    assert [i.name for i in old.graph.input][0] == "X" and len(old.graph.input) == 7  # input untouched


def test_weight_inputs_option_compresses_weights_listed_as_inputs(rng):
    # IR 4+: the listing marks the weights as overridable, so only the option compresses them
    model = small_cnn(rng)
    listed = weights_listed_as_inputs(model)
    onnx.checker.check_model(listed, full_check=True)
    with pytest.raises(NoEligibleLayerError, match="--weight-inputs"):
        compress_model(listed, CompressConfig(min_elements=0))
    with pytest.warns(CodebookWarning, match="listed as graph inputs are treated as constants"):
        out = compress_model(listed, CompressConfig(min_elements=0, weight_inputs=True))
    ref = compress_model(model, CompressConfig(min_elements=0))
    assert [l.name for l in out.layers] == [l.name for l in ref.layers] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert [i.name for i in out.model.graph.input] == ["X"] and out.model.ir_version == model.ir_version
    feeds = feeds_for(model, rng)
    np.testing.assert_array_equal(run(out.model, feeds)[0], run(ref.model, feeds)[0])


def test_non_float_weight_is_skipped(rng):
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")]
    model = make_model(nodes, [helper.make_tensor_value_info("A", TensorProto.INT32, [2, 8])],
                       [helper.make_tensor_value_info("Y", TensorProto.INT32, [2, 8])],
                       [init("W", np.ones((8, 8), np.int32))])
    layers, skipped = select(model)
    assert layers == [] and "int32" in skipped[0].reason
