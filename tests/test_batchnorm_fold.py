"""BatchNormalization after Conv / ConvTranspose is folded into the weights before compression."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_codebook as oc
from onnx_codebook.schema import DOMAIN
from onnx_codebook.select import fold_batch_norms

from conftest import helper, init, make_model, randn


def _plain_run(model, feeds):
    # ORT_DISABLE_ALL: onnxruntime's own Conv + BatchNormalization fusion must not
    # hide a wrong fold on the reference side
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def bn_model(rng, op="Conv", *, group=1, bias=True, cin=8, cout=12, spatial=2, relu=True, extra_use=False,
             training=False):
    """X -> op(W[, B]) -> BatchNormalization -> [Relu] -> Y (and the op's output also to Y2 with extra_use)."""
    k = [3] * spatial
    w = randn(rng, cout, cin // group, *k) if op == "Conv" else randn(rng, cin, cout // group, *k)
    inits = [init("W", w)]
    ins = ["X", "W"]
    if bias:
        inits.append(init("B", randn(rng, cout)))
        ins.append("B")
    strides = [1] * spatial if op == "Conv" else [2] * spatial
    nodes = [helper.make_node(op, ins, ["c"], name="conv", group=group, strides=strides, pads=[1] * 2 * spatial)]
    scale, shift = 1 + randn(rng, cout), randn(rng, cout)
    mean, var = randn(rng, cout), 0.5 + np.abs(randn(rng, cout, scale=1.0))
    inits += [init("s", scale), init("t", shift), init("m", mean), init("v", var)]
    bn_attrs = {"epsilon": 1e-3}
    if training:
        bn_attrs["training_mode"] = 1
    bn_out = ["n", "running_mean", "running_var"] if training else ["n"]
    nodes.append(helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], bn_out, name="bn", **bn_attrs))
    nodes.append(helper.make_node("Relu", ["n"], ["Y"], name="relu") if relu else
                 helper.make_node("Identity", ["n"], ["Y"], name="id"))
    size = [7] * spatial
    y_shape = [2, cout, *([7] * spatial if op == "Conv" else [13] * spatial)]
    outputs = [("Y", y_shape)]
    if extra_use:
        nodes.append(helper.make_node("Sigmoid", ["c"], ["Y2"], name="other"))
        outputs.append(("Y2", y_shape))
    return make_model(nodes, [("X", [2, cin, *size])], outputs, inits, opset=17)


@pytest.mark.parametrize("op, group, bias, spatial", [
    ("Conv", 1, True, 2), ("Conv", 4, False, 2), ("Conv", 1, False, 1),
    ("ConvTranspose", 1, True, 2), ("ConvTranspose", 2, False, 2), ("ConvTranspose", 4, True, 1),
])
def test_fold_keeps_the_outputs(op, group, bias, spatial):
    rng = np.random.default_rng(group + spatial)
    model = bn_model(rng, op, group=group, bias=bias, spatial=spatial)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_batch_norms(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    feeds = {"X": rng.standard_normal((2, 8, *[7] * spatial)).astype(np.float32)}
    want, got = _plain_run(model, feeds), _plain_run(folded, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("kwargs", [{"extra_use": True}, {"training": True}])
def test_fold_leaves_what_it_cannot_fold(kwargs):
    model = bn_model(np.random.default_rng(0), **kwargs)
    assert fold_batch_norms(model) == 0
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]


def test_fold_skips_a_shared_weight_and_runtime_parameters():
    rng = np.random.default_rng(1)
    model = bn_model(rng)
    other = helper.make_node("Conv", ["X", "W"], ["Y2"], name="twin", pads=[1, 1, 1, 1])
    model.graph.node.append(other)
    model.graph.output.append(helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, [2, 12, 7, 7]))
    assert fold_batch_norms(model) == 0
    model = bn_model(rng)  # a weight that is also a graph input can be overridden at run time
    model.graph.input.append(helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [12, 8, 3, 3]))
    assert fold_batch_norms(model) == 0
    model = bn_model(rng)
    s = next(t for t in model.graph.initializer if t.name == "s")
    model.graph.initializer.remove(s)
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [12]))
    assert fold_batch_norms(model) == 0


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_fused_op_takes_the_relu_after_a_folded_normalisation(op, require_ops):
    rng = np.random.default_rng(2)
    model = bn_model(rng, op, cin=16, cout=16)
    result = oc.compress_with_report(model, format="fused", bits=4, granularity="channel", min_elements=0)
    nodes = [n for n in result.model.graph.node]
    assert [(n.domain, n.op_type) for n in nodes] == [(DOMAIN, f"Codebook{op}")]
    assert {a.name: a for a in nodes[0].attribute}["activation"].s == b"Relu"
    standard = oc.compress(model, bits=4, granularity="channel", min_elements=0)
    feeds = {"X": rng.standard_normal((2, 16, 7, 7)).astype(np.float32)}
    got = oc.session(result.model).run(None, feeds)[0]
    want = oc.session(standard).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
