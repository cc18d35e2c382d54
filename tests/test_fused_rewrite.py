"""compress --format fused: the rewrite emits the custom ops, which agree with the standard format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnx_codebook as oc
from onnx_codebook.cli import app
from onnx_codebook.errors import CodebookWarning
from onnx_codebook.schema import DOMAIN

from conftest import (conv_model, conv_transpose_model, feeds_for, gemm_model, matmul_model, shared_weight_model,
                      small_cnn)

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _library(require_ops):
    pass


def _run(model, feeds):
    return oc.session(model).run(None, feeds)[0]


def _close(reference, got):
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=RTOL * float(np.abs(reference).max()))


def _fused_ops(model):
    return sorted(n.op_type for n in model.graph.node if n.domain == DOMAIN)


CASES = {
    "conv": (lambda r: conv_model(r), ["CodebookConv"]),
    "depthwise": (lambda r: conv_model(r, cout=16, cin=16, group=16), ["CodebookConv"]),
    "grouped": (lambda r: conv_model(r, cout=16, cin=16, group=4), ["CodebookConv"]),
    "gemm-transB": (lambda r: gemm_model(r, trans_b=1), ["CodebookGemm"]),
    "gemm": (lambda r: gemm_model(r, trans_b=0), ["CodebookGemm"]),
    "matmul-batched": (lambda r: matmul_model(r, batch_shape=(2, 3)), ["CodebookMatMul"]),
    "shared": (lambda r: shared_weight_model(r), ["CodebookMatMul", "CodebookMatMul"]),
    "cnn": (lambda r: small_cnn(r), ["CodebookConv", "CodebookConv", "CodebookGemm"]),
    "conv-transpose": (lambda r: conv_transpose_model(r), ["CodebookConvTranspose"]),
    "conv-transpose-grouped": (lambda r: conv_transpose_model(r, cin=32, cout=12, group=2),
                               ["CodebookConvTranspose"]),
}


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_standard(case, granularity, bits):
    rng = np.random.default_rng(bits)
    make, expected_ops = CASES[case]
    model = make(rng)
    opts = dict(bits=bits, granularity=granularity, group_size=3, min_elements=0)
    try:
        standard = oc.compress_with_report(model, **opts)
    except oc.NoEligibleLayerError:
        standard = None  # 8-bit containers + codebook would not make a tiny layer smaller
    try:
        result = oc.compress_with_report(model, format="fused", **opts)
    except oc.NoEligibleLayerError:
        assert standard is None
        pytest.skip("a 256-entry codebook does not pay for itself on this tiny layer, in either format")
    fused = result.model
    # Layers whose codebook would cost more than it saves stay float (small layers at 8 bits).
    kept_float = {s.name for s in result.skipped}
    assert _fused_ops(fused) == expected_ops if not kept_float else set(_fused_ops(fused)) <= set(expected_ops)
    assert all(r.format == "fused" for r in result.layers)
    onnx.checker.check_model(fused, full_check=True)
    feeds = feeds_for(model, rng)
    plan = lambda r: [(l.name, l.group_size) for l in r.layers]
    if standard is not None:
        # A layer both formats compress gets the same groups in both (the standard
        # format may leave a tiny layer float where its wider containers would not pay).
        both = {name for name, _ in plan(standard)} & {name for name, _ in plan(result)}
        assert [p for p in plan(standard) if p[0] in both] == [p for p in plan(result) if p[0] in both]
        if plan(standard) == plan(result):
            _close(_run(standard.model, feeds), _run(fused, feeds))
    # decompress turns the fused ops back into plain ones with the same weights.
    plain = oc.decompress(fused)
    assert _fused_ops(plain) == [] and all(o.domain != DOMAIN for o in plain.opset_import)
    onnx.checker.check_model(plain, full_check=True)
    _close(_run(fused, feeds), _run(plain, feeds))


def test_formats_coarsen_a_small_layer_alike():
    # A 1x1 convolution with 10 input channels: per-channel codebooks cost more than
    # they save, so the groups are coarsened -- the same way in both formats (the
    # standard format's 4-bit containers and offsets used to coarsen it to 4 channels
    # where the fused format kept 2), so both give the same outputs.
    from conftest import helper, init, make_model, randn

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    model = make_model(nodes, [("X", [2, 10, 5, 5])], [("Y", [2, 40, 5, 5])], [init("W", randn(rng, 40, 10, 1, 1))])
    results = {fmt: oc.compress_with_report(model, format=fmt, min_elements=0) for fmt in ("standard", "fused")}
    sizes = {fmt: [l.group_size for l in r.layers] for fmt, r in results.items()}
    assert sizes["standard"] == sizes["fused"] and sizes["fused"][0] > 1
    feeds = feeds_for(model, rng)
    _close(_run(results["standard"].model, feeds), _run(results["fused"].model, feeds))


def test_shared_fused_weight_is_stored_once():
    model = shared_weight_model(np.random.default_rng(0))
    fused = oc.compress(model, format="fused", min_elements=0)
    nodes = [n for n in fused.graph.node if n.domain == DOMAIN]
    assert len(nodes) == 2 and nodes[0].input[1:3] == nodes[1].input[1:3]
    assert sum(t.name.endswith(".indices") for t in fused.graph.initializer) == 1


@pytest.mark.parametrize("kwargs", [{"auto_pad": "SAME_UPPER"}, {"output_shape": [13, 13]}, {"cin": 12, "group": 2}])
def test_conv_transpose_keeps_the_standard_decode(kwargs):
    # implicit padding stays with onnxruntime's own arithmetic, and 6 input channels
    # per group would pad the kernel's index rows to 8 (a third more memory)
    model = conv_transpose_model(np.random.default_rng(0), **kwargs)
    with pytest.warns(CodebookWarning, match=r"1 of 1 layers keep the standard decode .*ConvTranspose with"):
        fused = oc.compress(model, format="fused", min_elements=0)
    assert _fused_ops(fused) == [] and any(n.op_type == "Gather" for n in fused.graph.node)
    feeds = feeds_for(model, np.random.default_rng(1))
    _close(_run(oc.decompress(fused), feeds), _run(fused, feeds))


def test_bundled_model_fused_accuracy_equals_standard(tmp_path):
    runner = CliRunner()
    for fmt in ("standard", "fused"):
        result = runner.invoke(app, ["compress", str(DIGITS), "-o", str(tmp_path / f"{fmt}.onnx"), "--bits", "4",
                                     "--granularity", "channel", "--format", fmt])
        assert result.exit_code == 0, result.output
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert _fused_ops(fused)
    acc = {fmt: oc.evaluate(tmp_path / f"{fmt}.onnx", "sklearn:digits") for fmt in ("standard", "fused")}
    assert acc["fused"]["top1"] == acc["standard"]["top1"]
    info = oc.inspect(fused)
    assert {l["format"] for l in info["layers"] if l["format"] != "float"} == {"fused"}
    assert info["compression_ratio"] > 6


@pytest.mark.parametrize("opset,bounds", [(10, "attributes"), (21, "initializers"), (17, "Constant nodes")])
def test_epilogue_folded_and_unfolded(opset, bounds):
    # Conv -> Add(X) -> Clip(0, 6) and Conv -> Relu fold into the fused ops' epilogue,
    # whether Clip's bounds are attributes, initializers or Constant nodes (PyTorch's
    # ReLU6); decompress writes them out again as plain Add / Clip / Relu with the same
    # outputs.
    from conftest import helper, init, make_model, randn

    rng = np.random.default_rng(opset)
    clip = (helper.make_node("Clip", ["s"], ["c"], name="clip", min=0.0, max=6.0) if opset < 11 else
            helper.make_node("Clip", ["s", "lo", "hi"], ["c"], name="clip"))
    inits = [init("W1", randn(rng, 16, 16, 3, 3)), init("B1", randn(rng, 16)), init("W2", randn(rng, 16, 16, 3, 3))]
    constants = []
    if bounds == "initializers":
        inits += [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    elif bounds == "Constant nodes":
        constants = [helper.make_node("Constant", [], ["lo"], name="lo", value=onnx.numpy_helper.from_array(
                         np.array(0.0, np.float32))),
                     helper.make_node("Constant", [], ["hi"], name="hi", value_float=6.0)]
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["y1"], name="conv1", pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("Add", ["y1", "X"], ["s"], name="add"),
        clip,
        helper.make_node("Conv", ["c", "W2"], ["y2"], name="conv2", pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("Relu", ["y2"], ["Y"], name="relu"),
    ]
    model = make_model(constants + nodes, [("X", [1, 16, 8, 8])], [("Y", [1, 16, 8, 8])], inits, opset=opset)
    fused = oc.compress(model, format="fused", bits=4, granularity="channel", min_elements=0)
    assert [n.op_type for n in fused.graph.node] == ["CodebookConv", "CodebookConv"]
    conv1 = fused.graph.node[0]
    assert len(conv1.input) == 5 and conv1.input[4] == "X"
    assert {a.name: a for a in conv1.attribute}["activation"].s == b"Clip"
    feeds = feeds_for(model, rng)
    plain = oc.decompress(fused)
    assert sorted(n.op_type for n in plain.graph.node if n.op_type != "Constant") == ["Add", "Clip", "Conv", "Conv", "Relu"]
    onnx.checker.check_model(plain, full_check=True)
    _close(_run(fused, feeds), _run(plain, feeds))


def _activation_graph(activation, gemm=False, opset=17):
    """X -> Conv 16->24 3x3 (or Gemm 64->40) -> the activation as an exporter writes it -> Y."""
    from conftest import helper, init, make_model, randn

    rng = np.random.default_rng(len(activation))
    if gemm:
        inits = [init("W", randn(rng, 64, 40)), init("B", randn(rng, 40))]
        first = helper.make_node("Gemm", ["X", "W", "B"], ["y"], name="gemm")
        shapes = [("X", [3, 64])], [("Y", [3, 40])]
    else:
        inits = [init("W", randn(rng, 24, 16, 3, 3, scale=0.3)), init("B", randn(rng, 24))]
        first = helper.make_node("Conv", ["X", "W", "B"], ["y"], name="conv", pads=[1] * 4, kernel_shape=[3, 3])
        shapes = [("X", [2, 16, 7, 7])], [("Y", [2, 24, 7, 7])]
    make = helper.make_node
    after = {
        "LeakyRelu": [make("LeakyRelu", ["y"], ["Y"], alpha=0.2)],
        "Sigmoid": [make("Sigmoid", ["y"], ["Y"])],
        "Tanh": [make("Tanh", ["y"], ["Y"])],
        "HardSigmoid": [make("HardSigmoid", ["y"], ["Y"], alpha=0.25, beta=0.4)],
        "HardSwish": [make("HardSwish", ["y"], ["Y"])],
        # SiLU as torch.onnx.export writes nn.SiLU, and with the Mul's inputs swapped
        "Silu": [make("Sigmoid", ["y"], ["s"]), make("Mul", ["y", "s"], ["Y"])],
        "Silu-swapped": [make("Sigmoid", ["y"], ["s"]), make("Mul", ["s", "y"], ["Y"])],
        # HardSwish as exporters write it before opset 14
        "HardSigmoid+Mul": [make("HardSigmoid", ["y"], ["s"], alpha=1 / 6, beta=0.5), make("Mul", ["y", "s"], ["Y"])],
    }[activation]
    return make_model([first] + after, *shapes, inits, opset=opset), rng


FOLDED = {"LeakyRelu": "LeakyRelu", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "HardSigmoid": "HardSigmoid",
          "HardSwish": "HardSwish", "Silu": "Silu", "Silu-swapped": "Silu", "HardSigmoid+Mul": "HardSwish"}


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("activation", sorted(FOLDED))
def test_activations_fold_into_the_fused_op(activation, gemm):
    # The activation (or the gated Mul(y, Sigmoid(y)) / Mul(y, HardSigmoid(y))) folds
    # into the fused op; the fused model equals both the standard format and the
    # decompressed one, in which decompress wrote the activation out as plain ops again.
    model, rng = _activation_graph(activation, gemm, opset=13 if activation == "HardSigmoid+Mul" else 17)
    fused = oc.compress(model, format="fused", bits=4, granularity="channel", min_elements=0)
    assert [n.op_type for n in fused.graph.node] == ["CodebookGemm" if gemm else "CodebookConv"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["activation"].decode() == FOLDED[activation]
    feeds = feeds_for(model, rng)
    standard = oc.compress(model, bits=4, granularity="channel", min_elements=0)
    _close(_run(standard, feeds), _run(fused, feeds))
    plain = oc.decompress(fused)
    onnx.checker.check_model(plain, full_check=True)
    _close(_run(fused, feeds), _run(plain, feeds))


def test_gated_activation_stays_when_its_input_is_read_elsewhere():
    # Mul(y, Sigmoid(y)) folds only when nothing else reads y or the gate
    from conftest import helper, init, make_model, randn

    rng = np.random.default_rng(0)
    make = helper.make_node
    nodes = [make("Conv", ["X", "W"], ["y"], name="conv", pads=[1] * 4, kernel_shape=[3, 3]),
             make("Sigmoid", ["y"], ["s"]), make("Mul", ["y", "s"], ["m"]), make("Add", ["m", "s"], ["Y"])]
    model = make_model(nodes, [("X", [1, 16, 6, 6])], [("Y", [1, 16, 6, 6])], [init("W", randn(rng, 16, 16, 3, 3))],
                       opset=17)
    fused = oc.compress(model, format="fused", bits=4, min_elements=0)
    assert [n.op_type for n in fused.graph.node] == ["CodebookConv", "Sigmoid", "Mul", "Add"]
    assert not any(a.name == "activation" for a in fused.graph.node[0].attribute)
    feeds = feeds_for(model, rng)
    _close(_run(oc.decompress(fused), feeds), _run(fused, feeds))


def test_float16_model_keeps_the_standard_decode():
    # the kernels compute in float32: a float16 model's layers keep Cast + Gather in
    # the fused format (onnxruntime would reject a float16 input to the fused op)
    from conftest import helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1, 32, 8, 8])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.warns(CodebookWarning, match=r"w \(float16 weight\)"):
        result = oc.compress_with_report(model, format="fused", min_elements=0)
    assert _fused_ops(result.model) == [] and [l.format for l in result.layers] == ["standard"]
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float16)
    standard = oc.compress(model, min_elements=0)
    np.testing.assert_array_equal(_run(result.model, {"x": x}), _run(standard, {"x": x}))
