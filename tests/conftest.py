"""Small models built with onnx.helper, and helpers to run and compare them.

Every builder returns a model that passes ``onnx.checker.check_model(full_check=True)``
and runs in onnxruntime; weights come from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

# pytest runs with --import-mode=importlib: make these helpers importable as ``conftest`` in tests.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

FLOAT = TensorProto.FLOAT
# Opset 21 (UINT4 Cast) needs IR 10; opset 25 (UINT2 Cast) needs IR 11+; onnxruntime 1.31 loads IR <= 13.
IR_FOR_OPSET = {13: 7, 17: 8, 21: 10, 25: 11}


def make_model(
    nodes,
    inputs,
    outputs,
    initializers=(),
    *,
    opset: int = 21,
    name: str = "test_graph",
    extra_opsets=(),
) -> onnx.ModelProto:
    """A checked model from helper parts; ``inputs``/``outputs`` are (name, shape) pairs or ValueInfos."""

    def vi(x):
        return x if isinstance(x, onnx.ValueInfoProto) else helper.make_tensor_value_info(x[0], FLOAT, x[1])

    graph = helper.make_graph(list(nodes), name, [vi(i) for i in inputs], [vi(o) for o in outputs],
                              initializer=list(initializers))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
        ir_version=IR_FOR_OPSET.get(opset, 10),
        producer_name="onnx-codebook-tests",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def randn(rng, *shape, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- builders


def conv_model(rng, cout=16, cin=16, k=3, *, group=1, bias=True, opset=21, hw=8, weight=None):
    """X[1,cin,hw,hw] -> Conv(W[cout,cin/group,k,k], B) -> Relu -> Y."""
    w = randn(rng, cout, cin // group, k, k) if weight is None else weight.astype(np.float32)
    inits = [init("W", w)]
    conv_in = ["X", "W"]
    if bias:
        inits.append(init("B", randn(rng, cout)))
        conv_in.append("B")
    nodes = [
        helper.make_node("Conv", conv_in, ["C"], name="conv", group=group, pads=[k // 2] * 4, kernel_shape=[k, k]),
        helper.make_node("Relu", ["C"], ["Y"], name="relu"),
    ]
    return make_model(nodes, [("X", [1, cin, hw, hw])], [("Y", [1, cout, hw, hw])], inits, opset=opset)


def conv_transpose_model(rng, cin=16, cout=12, k=3, *, group=1, opset=21, **attrs):
    """X[1,cin,6,6] -> ConvTranspose(W[cin,cout/group,k,k], stride 2, attrs) -> Y."""
    w = randn(rng, cin, cout // group, k, k)
    nodes = [helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], name="deconv", strides=[2, 2],
                              kernel_shape=[k, k], group=group, **attrs)]
    out = (6 - 1) * 2 + k
    if "output_shape" in attrs:
        out = attrs["output_shape"][0]
    elif attrs.get("auto_pad", "").startswith("SAME"):
        out = 6 * 2
    return make_model(nodes, [("X", [1, cin, 6, 6])], [("Y", [1, cout, out, out])],
                      [init("W", w), init("B", randn(rng, cout))], opset=opset)


def gemm_model(rng, n=48, kdim=64, *, trans_b=1, opset=21, batch=4):
    """A[batch,kdim] -> Gemm(B, C, transB) -> Y[batch,n]."""
    w = randn(rng, n, kdim) if trans_b else randn(rng, kdim, n)
    nodes = [helper.make_node("Gemm", ["A", "W", "C"], ["Y"], name="fc", transB=trans_b, alpha=1.0, beta=1.0)]
    return make_model(nodes, [("A", [batch, kdim])], [("Y", [batch, n])],
                      [init("W", w), init("C", randn(rng, n))], opset=opset)


def matmul_model(rng, kdim=64, n=40, *, batch_shape=(3,), opset=21):
    """A[*batch_shape, kdim] @ W[kdim, n] -> Y (a batched LHS when ``batch_shape`` has 2+ dims)."""
    w = randn(rng, kdim, n)
    lhs_shape = (*batch_shape, kdim)
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")]
    return make_model(nodes, [("A", list(lhs_shape))], [("Y", [*lhs_shape[:-1], n])], [init("W", w)], opset=opset)


def shared_weight_model(rng, kdim=64, n=64, *, opset=21):
    """Y = (A @ W) @ W: one initializer consumed by two MatMul nodes."""
    w = randn(rng, kdim, n)
    nodes = [
        helper.make_node("MatMul", ["A", "W"], ["H"], name="mm1"),
        helper.make_node("MatMul", ["H", "W"], ["Y"], name="mm2"),
    ]
    return make_model(nodes, [("A", [2, kdim])], [("Y", [2, n])], [init("W", w)], opset=opset)


def constant_node_model(rng, cout=16, cin=8, *, opset=21):
    """Paddle-style: the Conv weight is the output of a Constant node, not an initializer."""
    w = randn(rng, cout, cin, 3, 3)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="w_const", value=init("W_value", w)),
        helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("X", [1, cin, 6, 6])], [("Y", [1, cout, 6, 6])], opset=opset)


def small_cnn(rng, *, opset=21, classes=10):
    """X[N,1,8,8] -> Conv 16 -> Relu -> Conv 32 -> Relu -> GlobalAvgPool -> Flatten -> Gemm -> Y[N,classes]."""
    inits = [
        init("conv1.weight", randn(rng, 16, 1, 3, 3, scale=0.5)),
        init("conv1.bias", randn(rng, 16)),
        init("conv2.weight", randn(rng, 32, 16, 3, 3)),
        init("conv2.bias", randn(rng, 32)),
        init("fc.weight", randn(rng, classes, 32, scale=0.3)),
        init("fc.bias", randn(rng, classes)),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["Y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("X", FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("Y", FLOAT, ["N", classes])
    return make_model(nodes, [x], [y], inits, opset=opset, name="small_cnn")


# --------------------------------------------------------------------------- running


def feeds_for(model: onnx.ModelProto, rng, batch: int = 2) -> dict[str, np.ndarray]:
    """Random float inputs for every real graph input (symbolic dims become ``batch``)."""
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_rms(reference: np.ndarray, approx: np.ndarray) -> float:
    """RMS error relative to the RMS of the reference."""
    ref = np.asarray(reference, np.float64)
    return float(np.sqrt(np.mean((ref - approx) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def weights_listed_as_inputs(model: onnx.ModelProto, ir_version: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also lists every initializer as a graph input, as IR version 3
    requires and keep_initializers_as_inputs exports write (with ``ir_version`` set, if given)."""
    listed = onnx.ModelProto()
    listed.CopyFrom(model)
    if ir_version is not None:
        listed.ir_version = ir_version
    names = {i.name for i in listed.graph.input}
    listed.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in listed.graph.initializer if t.name not in names)
    return listed


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer]


def default_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def cnn_path(tmp_path_factory):
    """A small CNN saved to disk (read-only for tests: copy it before writing next to it)."""
    path = tmp_path_factory.mktemp("models") / "small_cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(7)), str(path))
    return path


@pytest.fixture(scope="module")
def require_ops():
    """Skip when the custom-op library is missing, except in CI (ONNX_CODEBOOK_REQUIRE_OPS=1), where it fails."""
    import os

    from onnx_codebook import ops

    ok, message = ops.library_status()
    if not ok:
        if os.environ.get("ONNX_CODEBOOK_REQUIRE_OPS") == "1":
            pytest.fail(f"ONNX_CODEBOOK_REQUIRE_OPS=1 but {message}")
        pytest.skip(message)
