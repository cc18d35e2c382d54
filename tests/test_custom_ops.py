"""The fused custom ops against plain onnxruntime Conv / Gemm / MatMul.

Each case builds a fused model straight from the spec in ``onnx_codebook.schema``
(random codebook and indices, packed with ``pack_bits``) and the same graph with the
decoded float weight, runs both in onnxruntime and compares them.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_codebook import ops, schema
from onnx_codebook.pack import pack_bits

RTOL = 1e-4
OPSET = 17
IR_VERSION = 8


@pytest.fixture(scope="module", autouse=True)
def _library(require_ops):
    """Skip without the library, fail in CI (conftest.require_ops)."""


# ----------------------------------------------------------------------------- helpers


def random_weight(rng, shape, axis, bits, group_size, k=None):
    """(codebook [G, k], indices of `shape`, decoded float weight)."""
    channels = shape[axis]
    groups = -(-channels // group_size)
    k = k or int(rng.integers(1, 2**bits + 1))
    codebook = rng.standard_normal((groups, k)).astype(np.float32)
    indices = rng.integers(0, k, size=shape).astype(np.uint8)
    group_of = np.arange(channels) // group_size
    expand = [1] * len(shape)
    expand[axis] = channels
    rows = group_of.reshape(expand)
    weight = codebook[np.broadcast_to(rows, shape), indices].astype(np.float32)
    return codebook, indices, weight


def make_model(nodes, inputs, outputs, initializers, fused):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if fused:
        opsets.append(helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    return model


def run(model, feeds, threads=1, runs=1):
    """The first output of the last of `runs` runs of one session; the runs before it
    get the inputs negated, so that a kernel reading data left by an earlier run fails."""
    options = ops.session_options(ops.uses_ops(model), threads)
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs - 1):
        sess.run(None, {k: -v for k, v in feeds.items()})
    return sess.run(None, feeds)[0]


def run_with_env(body: str, **env_overrides: str) -> None:
    """Runs `body` in a fresh interpreter with this module imported as `t` (and numpy as
    np), the package's library and `env_overrides` in its environment (the kernels read
    their ONNX_CODEBOOK_* switches once, when the library loads); fails with its stderr."""
    import subprocess
    import sys

    script = (
        "import importlib.util, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(__file__)!r})\n"
        "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n" + body
    )
    env = dict(os.environ, ONNX_CODEBOOK_OPS_LIBRARY=str(ops.library_path()), **env_overrides)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def tensor_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def compare(fused_nodes, plain_nodes, feeds, fused_inits, plain_inits, threads=1, runs=1, scale=None):
    """The fused model's output equals the plain one's to RTOL, relative to `scale` (default:
    the largest output)."""
    inputs = [tensor_info(n, v.shape) for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    fused = make_model(fused_nodes, inputs, outputs, fused_inits, fused=True)
    plain = make_model(plain_nodes, inputs, outputs, plain_inits, fused=False)
    got = run(fused, feeds, threads, runs)
    want = run(plain, feeds, threads)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max(initial=0.0)) if scale is None else scale, 1e-6)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def codebook_inits(codebook, indices, bits):
    return [
        numpy_helper.from_array(pack_bits(indices, bits), "w.indices"),
        numpy_helper.from_array(codebook, "w.codebook"),
    ]


def fused_attrs(bits, shape, group_size):
    return {"bits": bits, "weight_shape": list(shape), "group_size": group_size}


# Every activation the fused epilogue applies, and the attributes the tests give them
# (non-default, so that reading them is tested too).
ACTIVATIONS = ["Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Silu"]
LEAKY_ALPHA, HARD_SIGMOID = 0.15, (0.3, 0.45)


def epilogue_attrs(activation, bounds):
    """Fused epilogue attributes (none for the default, no activation)."""
    if not activation:
        return {}
    attrs = {"activation": activation}
    if activation == "Clip":
        attrs["activation_min"], attrs["activation_max"] = bounds
    elif activation == "LeakyRelu":
        attrs["activation_alpha"] = LEAKY_ALPHA
    elif activation == "HardSigmoid":
        attrs["activation_alpha"], attrs["activation_beta"] = HARD_SIGMOID
    return attrs


def plain_epilogue(node, activation, bounds, residual):
    """`node` (writing "y") followed by Add(z) and the activation as plain ONNX ops; (nodes, initializers)."""
    nodes, inits, out = [node], [], "y"
    if not residual and not activation:
        return nodes, inits
    node.output[0] = "y0"
    cur = "y0"
    if residual:
        nodes.append(helper.make_node("Add", [cur, "z"], ["y1" if activation else out]))
        cur = "y1"
    if activation == "Clip":
        inits = [numpy_helper.from_array(np.float32(bounds[0]), "clip_lo"),
                 numpy_helper.from_array(np.float32(bounds[1]), "clip_hi")]
        nodes.append(helper.make_node("Clip", [cur, "clip_lo", "clip_hi"], [out]))
    elif activation == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", [cur], [out], alpha=LEAKY_ALPHA))
    elif activation == "HardSigmoid":
        nodes.append(helper.make_node("HardSigmoid", [cur], [out], alpha=HARD_SIGMOID[0], beta=HARD_SIGMOID[1]))
    elif activation == "Silu":
        nodes += [helper.make_node("Sigmoid", [cur], ["gate"]), helper.make_node("Mul", [cur, "gate"], [out])]
    elif activation:  # Relu, Sigmoid, Tanh, HardSwish
        nodes.append(helper.make_node(activation, [cur], [out]))
    return nodes, inits


# ----------------------------------------------------------------------------- Conv


def conv_case(rng, *, spatial=2, batch=None, cin=None, cout=None, group=None, kernel=None, stride=None,
              dilation=None, pads=None, auto_pad=None, bias=None, bits=None, group_size=None, threads=1,
              activation="", bounds=(-0.5, 0.75), residual=False, size=None, runs=1, z_scale=1.0, zeros=0.0):
    batch = batch or int(rng.integers(1, 3))
    group = group or int(rng.choice([1, 1, 2, 3]))
    cin = cin or group * int(rng.integers(1, 5))
    cout = cout or group * int(rng.integers(1, 5))
    kernel = kernel or [int(rng.integers(1, 4)) for _ in range(spatial)]
    stride = stride or [int(rng.integers(1, 3)) for _ in range(spatial)]
    dilation = dilation or [int(rng.integers(1, 3)) for _ in range(spatial)]
    size = size or [int(rng.integers(6, 12)) for _ in range(spatial)]
    bits = bits or int(rng.integers(1, 9))
    group_size = group_size or int(rng.choice([1, 2, 3, cout]))
    if bias is None:
        bias = bool(rng.integers(0, 2))
    attrs = {"strides": stride, "dilations": dilation, "group": group, "kernel_shape": kernel}
    if auto_pad is None:
        auto_pad = str(rng.choice(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad == "NOTSET":
        attrs["pads"] = pads or [int(rng.integers(0, 3)) for _ in range(2 * spatial)]
    else:
        attrs["auto_pad"] = auto_pad
        if auto_pad.startswith("SAME"):  # onnxruntime's reference Conv rejects dilated SAME
            attrs["dilations"] = [1] * spatial
    wshape = [cout, cin // group, *kernel]
    codebook, indices, weight = random_weight(rng, wshape, 0, bits, group_size)
    x = rng.standard_normal((batch, cin, *size)).astype(np.float32)
    x[rng.random(x.shape) < zeros] = 0.0  # as after a Relu
    b = rng.standard_normal(cout).astype(np.float32)
    ins_f = ["x", "w.indices", "w.codebook"] + (["b"] if bias else ([""] if residual else [])) + (["z"] if residual else [])
    ins_p = ["x", "W"] + (["b"] if bias else [])
    fused = helper.make_node(
        schema.CODEBOOK_CONV, ins_f, ["y"], domain=schema.DOMAIN, **attrs, **fused_attrs(bits, wshape, group_size),
        **epilogue_attrs(activation, bounds),
    )
    plain = helper.make_node("Conv", ins_p, ["y"], **attrs)
    extra = [numpy_helper.from_array(b, "b")] if bias else []
    plain_inits = [numpy_helper.from_array(weight, "W")] + extra
    feeds = {"x": x}
    # The plain Conv's output: Z has its shape, and its largest value is the scale of the
    # float error, which a Clip to a narrow window does not shrink.
    y_plain = run(make_model([plain], [tensor_info("x", x.shape)],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], plain_inits,
                             fused=False), feeds)
    if residual:
        feeds["z"] = (rng.standard_normal(y_plain.shape) * z_scale).astype(np.float32)
    plain_nodes, clip_inits = plain_epilogue(plain, activation, bounds, residual)
    compare(
        [fused],
        plain_nodes,
        feeds,
        codebook_inits(codebook, indices, bits) + extra,
        plain_inits + clip_inits,
        threads,
        runs,
        scale=float(np.abs(y_plain).max(initial=0.0)) if activation == "Clip" else None,
    )


@pytest.mark.parametrize("seed", range(40))
def test_conv2d_random(seed):
    conv_case(np.random.default_rng(seed))


@pytest.mark.parametrize("seed", range(10))
def test_conv1d_random(seed):
    conv_case(np.random.default_rng(100 + seed), spatial=1)


@pytest.mark.parametrize("seed", range(10))
def test_conv_depthwise(seed):
    rng = np.random.default_rng(200 + seed)
    c = int(rng.integers(1, 9))
    mult = int(rng.choice([1, 1, 2]))
    k = int(rng.choice([3, 5]))
    dilation = [1, 1] if k == 5 else None
    conv_case(rng, cin=c, cout=c * mult, group=c, kernel=[k, k], dilation=dilation, threads=int(rng.integers(1, 3)))


@pytest.mark.parametrize("size, stride", [(7, 1), (13, 2), (20, 1)])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_conv_depthwise_many_channels(size, stride, k):
    # 40 channels: blocks of 16 channel planes (small planes) with a partial last block
    # (each block's taps decoded as one [tap][16] panel)
    rng = np.random.default_rng(size * k)
    conv_case(rng, batch=2, cin=40, cout=40, group=40, kernel=[k, k], stride=[stride, stride], dilation=[1, 1],
              pads=[k // 2] * 4, auto_pad="NOTSET", bits=4, group_size=1, bias=True, activation="Clip",
              bounds=(-0.5, 0.5), residual=True, threads=2, size=[size, size])
    conv_case(rng, batch=1, cin=40, cout=40, group=40, kernel=[k, k], stride=[stride, stride], dilation=[2, 1],
              pads=[1, 0, 2, 1], auto_pad="NOTSET", bits=3, group_size=3, bias=False, threads=1,
              size=[size + 2 * k, size])
    # rectangular windows, mixed strides: the row kernels (column stride 1 or 2, no
    # column dilation) and the generic loop (column dilation 2) on the same thread
    conv_case(rng, batch=3, cin=20, cout=20, group=20, kernel=[k, 3], stride=[stride, 3 - stride],
              dilation=[1, 1], pads=[0, 1, 2, 1], auto_pad="NOTSET", bits=6, group_size=1, bias=True, threads=1,
              size=[size + k, size + 1])  # 6 bits: the taps decoded without the AVX-512 4-bit decoder
    conv_case(rng, batch=2, cin=20, cout=20, group=20, kernel=[3, k], stride=[1, stride], dilation=[1, 2],
              pads=[1, k, 1, k], auto_pad="NOTSET", bits=2, group_size=1, bias=True, threads=1, size=[size, size])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_auto_pad(auto_pad, stride):
    conv_case(np.random.default_rng(stride), auto_pad=auto_pad, stride=[stride, stride], kernel=[3, 2])


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_pointwise_large(threads):
    # K > one 256-deep block, channels > one tile, columns across images.
    rng = np.random.default_rng(7)
    conv_case(rng, batch=3, cin=300, cout=130, group=1, kernel=[1, 1], stride=[1, 1], dilation=[1, 1],
              auto_pad="VALID", bits=4, group_size=1, threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_3x3_large(threads):
    rng = np.random.default_rng(8)
    conv_case(rng, batch=2, cin=40, cout=100, group=1, kernel=[3, 3], stride=[1, 1], dilation=[1, 1],
              pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=5, group_size=7, bias=True, threads=threads)


@pytest.mark.parametrize(
    "kernel, stride, dilation, pads",
    [([3, 3], [2, 2], [1, 1], [1, 1, 1, 1]), ([5, 3], [1, 2], [2, 1], [2, 0, 1, 3]), ([1, 1], [2, 2], [1, 1], [0] * 4),
     ([3, 3], [3, 3], [2, 2], [0, 2, 1, 0]), ([7, 7], [2, 2], [1, 1], [3, 3, 3, 3]), ([1, 1], [1, 1], [1, 1], [1] * 4)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_strided_dilated_padded_large(kernel, stride, dilation, pads, threads):
    # Enough channels for several tiles, a non-square image, every stride phase and the
    # padded output grid (junk columns) with bias, residual and activation on top.
    rng = np.random.default_rng(sum(kernel) * 10 + stride[1])
    conv_case(rng, batch=2, cin=36, cout=70, group=1, kernel=kernel, stride=stride, dilation=dilation, pads=pads,
              auto_pad="NOTSET", bits=4, group_size=1, bias=True, activation="Relu", residual=True, threads=threads,
              size=[19, 26])
    conv_case(rng, batch=1, cin=24, cout=18, group=3, kernel=kernel, stride=stride, dilation=dilation, pads=pads,
              auto_pad="NOTSET", bits=3, group_size=5, bias=False, threads=threads, size=[23, 17])


@pytest.mark.parametrize(
    "size, kernel, stride, pads, batch, group, cout",
    [([7, 7], [3, 3], [1, 1], [1] * 4, 1, 1, 80), ([7, 7], [1, 1], [1, 1], [0] * 4, 1, 1, 80),
     ([14, 14], [1, 1], [2, 2], [0] * 4, 2, 1, 80), ([9, 13], [3, 3], [2, 1], [1, 0, 1, 2], 2, 1, 70),
     ([7, 7], [3, 3], [1, 1], [1] * 4, 2, 2, 128), ([6, 5], [3, 3], [1, 1], [1] * 4, 2, 8, 8 * 40)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_small_planes_many_channels(size, kernel, stride, pads, batch, group, cout, threads):
    # Small output planes with many channels, where the blocked GEMM would pad the
    # pixels to strips of 32: with AVX-512 these run pixel-major (pixels broadcast, 32
    # output channels in the vector lanes), 80 / 70 channels leaving a partial block of
    # 32; 8 groups of 40 run as (group, block) tasks of one parallel loop.  The
    # reduction spans two 256-deep blocks.
    cin = group * (300 if kernel == [1, 1] else 40)
    conv_case(np.random.default_rng(sum(size) + batch), batch=batch, cin=cin, cout=cout, group=group, kernel=kernel,
              stride=stride, dilation=[1, 1], pads=pads, auto_pad="NOTSET", bits=4, group_size=1, bias=True,
              activation="Relu", residual=True, threads=threads, size=size)


@pytest.mark.parametrize(
    "size, kernel, stride, dilation, pads, batch, group",
    [([8, 8], [8, 8], [1, 1], [1, 1], [0] * 4, 1, 1),  # classifier head over the last map
     ([7, 7], [7, 7], [2, 3], [1, 1], [0, 0, 1, 1], 3, 1),  # stride and end pads do not matter
     ([1, 1], [1, 1], [1, 1], [2, 3], [0] * 4, 11, 1),  # 1x1 on a pooled map, more than 8 rows
     ([1, 5], [1, 5], [1, 1], [3, 1], [0] * 4, 2, 1),
     ([6], [6], [1], [1], [0, 0], 2, 1),  # 1-D
     # near misses that take the other paths
     ([8, 8], [8, 8], [1, 1], [1, 1], [1, 0, 0, 0], 1, 1), ([7, 7], [7, 7], [2, 1], [1, 1], [1, 0, 0, 0], 2, 1),
     ([8, 8], [7, 8], [1, 1], [1, 1], [0] * 4, 2, 1),
     ([4, 4], [4, 4], [1, 1], [1, 1], [0] * 4, 2, 2)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_whole_window(size, kernel, stride, dilation, pads, batch, group, threads):
    # A window that is the whole unpadded input runs as a fully connected layer over
    # the images as they lie in memory, bias, residual and activation included.
    conv_case(np.random.default_rng(sum(size) * batch + len(size)), spatial=len(size), batch=batch, cin=24 * group,
              cout=40 * group, group=group, kernel=kernel, stride=stride, dilation=dilation, pads=pads,
              auto_pad="NOTSET", bits=3, group_size=1, bias=True, activation="Clip", residual=True,
              threads=threads, size=size)


@pytest.mark.parametrize(
    "size, kernel, stride, pads, batch, group, bits",
    [([4, 4], [3, 3], [1, 1], [1] * 4, 1, 1, 4), ([2, 2], [3, 3], [1, 1], [1] * 4, 3, 1, 2),
     ([5, 3], [3, 1], [2, 1], [1, 0, 0, 0], 2, 2, 3), ([3, 3], [2, 2], [1, 1], [0] * 4, 4, 1, 7),
     ([3, 5], [3, 3], [1, 1], [1] * 4, 1, 1, 1), ([2, 2], [3, 3], [1, 1], [1] * 4, 4, 2, 3)],
)
def test_conv_few_columns(size, kernel, stride, pads, batch, group, bits):
    # At most 16 output columns over the whole batch (the digits model's 4x4 layer):
    # an explicit im2col across images; with AVX-512, 13-16 columns run as the vector
    # lanes (the last two cases: 15 columns, and 16 across 4 images of 2x2), up to 12
    # pixel-major (tiles that cross output rows and images); without it, rows of the
    # weight against blocks of 8 columns.  70 output channels: a partial block of 32
    # (and of 16); 300 / kernel width input channels per group: reductions of 900,
    # several 256-deep blocks.
    conv_case(np.random.default_rng(sum(size) * batch + bits), batch=batch, cin=group * 300 // kernel[1],
              cout=70 * group, group=group, kernel=kernel, stride=stride, dilation=[1, 1], pads=pads,
              auto_pad="NOTSET", bits=bits, group_size=1, bias=True, activation="Clip", residual=True,
              threads=2, size=size)


@pytest.mark.parametrize(
    "size, kernel, stride, pads, batch, group, bits",
    [([2, 2], [3, 3], [1, 1], [1] * 4, 8, 1, 4), ([5, 5], [3, 3], [2, 2], [1] * 4, 3, 2, 3),
     ([1, 1], [1, 1], [1, 1], [0] * 4, 20, 1, 2), ([3], [3], [1], [1, 1], 7, 1, 4)],
)
def test_conv_short_rows(size, kernel, stride, pads, batch, group, bits):
    # More than 16 columns, output rows of at most 3 pixels (2x2, 3x3 from stride 2, a
    # 1x1 plane, 1-D of 3): with AVX-512 an explicit im2col across images feeds
    # pixel-major tiles of up to 12 columns instead of one tile per output row.
    conv_case(np.random.default_rng(batch + bits), spatial=len(size), batch=batch, cin=group * 40,
              cout=70 * group, group=group, kernel=kernel, stride=stride, dilation=[1] * len(size), pads=pads,
              auto_pad="NOTSET", bits=bits, group_size=1, bias=True, activation="Relu", residual=True, threads=2,
              size=size)


# Few-column convolutions with inputs partly zero, for the sparse-column GEMM (where the
# nonzero share is low enough it is chosen without forcing):
# (batch, cin, cout, kernel, stride, size, pads, zeros, bits).
SPARSE_CASES = [
    (1, 128, 256, [3, 3], [1, 1], [4, 4], [1, 1, 1, 1], 0.6, 4),  # the bundled CNN's 4x4 layer
    (1, 64, 40, [3, 3], [1, 1], [3, 3], [1, 1, 1, 1], 0.5, 3),  # 9 columns, a part-filled block of 32
    (2, 48, 33, [1, 1], [1, 1], [2, 2], [0, 0, 0, 0], 0.7, 2),  # 8 columns over two images
    (1, 300, 70, [3, 3], [1, 1], [4, 4], [1, 1, 1, 1], 0.6, 5),  # K = 2700: 11 reduction blocks
    (1, 20, 36, [2, 2], [2, 2], [7, 7], [0, 1, 0, 1], 0.0, 4),  # dense: 4x4 columns, stride 2
    (3, 40, 64, [3, 3], [1, 1], [2, 2], [1, 1, 1, 1], 1.0, 4),  # every input zero: bias and act only
    (16, 96, 50, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 0.8, 8),  # 16 images of one pixel, 8-bit
    # 1x1 convolutions of 17-64 columns, their input read in place (listed 16 columns at a time)
    (1, 300, 70, [1, 1], [1, 1], [7, 7], [0, 0, 0, 0], 0.7, 4),  # 49 columns, K = 300
    (2, 64, 100, [1, 1], [1, 1], [5, 5], [0, 0, 0, 0], 0.8, 3),  # two images of 25 pixels
    (1, 40, 33, [1, 1], [1, 1], [8, 8], [0, 0, 0, 0], 0.6, 2),  # 64 columns
]


def sparse_case(batch, cin, cout, kernel, stride, size, pads, zeros, bits, threads=1, seed=0):
    for activation, residual in [("Relu", False), ("Clip", True)]:
        conv_case(np.random.default_rng(seed), batch=batch, cin=cin, cout=cout, group=1, kernel=kernel, stride=stride,
                  dilation=[1, 1], pads=pads, auto_pad="NOTSET", bits=bits, group_size=1, bias=True,
                  activation=activation, residual=residual, size=size, threads=threads, runs=2, zeros=zeros)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_conv_sparse_columns(case, threads):
    """Few output columns with mostly zero inputs (run on the sparse-column GEMM where it
    is chosen) equal the plain Conv: entries listed per column over several reduction
    blocks, partial blocks of output channels, stride and padding, all-zero inputs, 1x1
    convolutions over several images."""
    sparse_case(*case, threads=threads)


def test_conv_sparse_columns_not_finite():
    """A NaN input reaches every output that reads it, and an infinite codebook entry
    makes 0 * inf = NaN where a zero input meets it, as in the plain Conv (a kernel that
    skips zero inputs must not run on such a codebook)."""
    rng = np.random.default_rng(3)
    wshape = [32, 64, 3, 3]
    codebook, indices, weight = random_weight(rng, wshape, 0, 4, 1, k=16)
    codebook[5, 7] = np.inf
    weight = codebook[np.arange(32)[:, None, None, None], indices]
    x = rng.standard_normal((1, 64, 4, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.7] = 0.0
    x[0, 3, 1, 2] = np.nan
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    fused = helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                             **attrs, **fused_attrs(4, wshape, 1))
    plain = helper.make_node("Conv", ["x", "W"], ["y"], **attrs)
    want = run(make_model([plain], [tensor_info("x", x.shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weight, "W")], fused=False), {"x": x})
    got = run(make_model([fused], [tensor_info("x", x.shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                         codebook_inits(codebook, indices, 4), fused=True), {"x": x})
    assert np.isnan(want).any() and not np.isnan(want).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=RTOL, atol=RTOL * np.abs(want[finite]).max())


PADDED_TAP_CASES = [
    # size, kernel, stride, dilation, pads, batch
    ([4, 4], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 8),
    ([2, 2], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 13),
    ([1, 1], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 20),
    ([5, 6], [5, 3], [1, 2], [1, 1], [2, 1, 3, 0], 3),
    ([7, 7], [3, 3], [1, 1], [2, 2], [2, 2, 2, 2], 1),
    ([6, 5], [3, 3], [2, 2], [1, 1], [0, 2, 2, 1], 6),
    ([9], [3], [1], [1], [1, 1], 12),
]


def padded_tap_case(size, kernel, stride, dilation, pads, batch, threads=1):
    """Small planes whose border pixels read padding with some taps: 40 input channels
    of 3x3 taps span two 256-deep reduction blocks; 40 output channels leave a partial
    block of 32."""
    conv_case(np.random.default_rng(batch + sum(pads)), spatial=len(size), batch=batch, cin=40, cout=40, group=1,
              kernel=kernel, stride=stride, dilation=dilation, pads=pads, auto_pad="NOTSET", bits=4, group_size=1,
              bias=True, activation="Relu", residual=True, threads=threads, size=size)


WINOGRAD_CASES = [
    # size, pads (or auto_pad), batch, cin, cout[, group]: 3x3 convolutions with stride 1, at
    # least 8 output tiles of 2x2, 16 input and 24 output channels (per group: 16 input
    # channels and a multiple of 16 output channels) run as Winograd F(2x2, 3x3) with AVX-512
    ([8, 8], [1, 1, 1, 1], 1, 32, 128),  # 16 tiles; on 2 threads each transforms the input itself
    ([7, 9], [0, 2, 1, 0], 2, 17, 40),  # odd output sizes, uneven pads, 17 channels, a partial block of 32
    ([4, 4], [1, 1, 1, 1], 2, 40, 20),  # 8 tiles over two images
    ([6, 6], [2, 2, 2, 2], 3, 48, 64),  # border tiles wholly in the padding
    ([21, 19], "SAME_LOWER", 1, 16, 40),  # 110 tiles: several chunks of tile rows
    ([5, 150], [1, 1, 1, 1], 1, 24, 24),  # 75 tiles per tile row: a chunk wider than 64 tiles
    ([14, 14], [1, 1, 1, 1], 1, 64, 64, 4),  # 16 channels per group: a block of 32 lanes spans two groups
    ([9, 11], [1, 0, 1, 2], 2, 96, 96, 2),  # 48 per group: the second block's halves in different groups
    ([8, 8], [1, 1, 1, 1], 1, 48, 48, 3),  # the last block: 16 lanes of the last group, 16 unused
    ([60, 60], [1, 1, 1, 1], 3, 64, 24),  # transformed in bands of 4 tile rows (512 KB); 30 per image
]


def winograd_case(size, pads, batch, cin, cout, group=1, threads=1):
    rng = np.random.default_rng(cin + cout + batch)
    auto_pad = pads if isinstance(pads, str) else "NOTSET"
    conv_case(rng, batch=batch, cin=cin, cout=cout, group=group, kernel=[3, 3], stride=[1, 1], dilation=[1, 1],
              pads=None if isinstance(pads, str) else pads, auto_pad=auto_pad, bits=int(rng.integers(1, 9)),
              group_size=int(rng.choice([1, 2, cout])), bias=True, activation=["Relu", "Clip"][cin % 2],
              residual=True, threads=threads, size=size, runs=2)


@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_winograd(case, threads):
    # test_fallback_kernels_in_subprocess runs the same cases with Winograd off.
    winograd_case(*case, threads=threads)


@pytest.mark.parametrize("case", PADDED_TAP_CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_skips_padded_taps(case, threads):
    # With AVX-512 the pixel-major tiles skip the taps that read padding for all their
    # pixels: row tiles skip tap rows, tiles of one pixel across images skip exactly
    # that pixel's padded taps.  test_fallback_kernels_in_subprocess forces each tiling.
    padded_tap_case(*case, threads=threads)


def test_conv_plans_follow_the_input_shape():
    # A kernel keeps the plans of the last 8 geometries it ran: one session, inputs of
    # 10 shapes (then the first ones again, evicted by then), each against plain Conv.
    rng = np.random.default_rng(7)
    wshape = [48, 24, 3, 3]
    codebook, indices, weight = random_weight(rng, wshape, 0, 4, 1)
    attrs = {"strides": [1, 1], "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 24, "h", "w"])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    fused = make_model([helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"],
                                         domain=schema.DOMAIN, **attrs, **fused_attrs(4, wshape, 1))],
                       [x_info], [y_info], codebook_inits(codebook, indices, 4), fused=True)
    plain = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)], [x_info], [y_info],
                       [numpy_helper.from_array(weight, "W")], fused=False)
    sessions = [ort.InferenceSession(m.SerializeToString(), ops.session_options(f, 2), providers=["CPUExecutionProvider"])
                for m, f in ((fused, True), (plain, False))]
    shapes = [(1, 8, 8), (8, 4, 4), (3, 2, 2), (12, 3, 5), (2, 7, 7), (5, 4, 4), (1, 14, 14), (9, 2, 2), (4, 6, 3),
              (16, 1, 1), (1, 8, 8), (8, 4, 4), (3, 2, 2)]
    for n, h, w in shapes:
        x = rng.standard_normal((n, 24, h, w)).astype(np.float32)
        got, want = (s.run(None, {"x": x})[0] for s in sessions)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()), err_msg=str((n, h, w)))


@pytest.mark.parametrize("batch", [2, 4, 9])
@pytest.mark.parametrize("path", ["phase", "columns", "depthwise"])
def test_conv_batch_split(batch, path):
    # On 2 threads, once a kernel has seen its pool run 2 threads, a batch that splits
    # evenly (or has at least 4 images per thread: 9 -> 4 + 5) runs as one part per
    # thread, each part on the path its own images take: 8x8 planes (phase grid),
    # 2x2 planes (an im2col over the part's images), depthwise.  Four runs of one
    # session, the last compared.
    size, cin, group = {"phase": ([8, 8], 24, 1), "columns": ([2, 2], 40, 2), "depthwise": ([7, 7], 20, 20)}[path]
    conv_case(np.random.default_rng(batch), batch=batch, cin=cin, cout=2 * cin, group=group, kernel=[3, 3],
              stride=[1, 1], dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=4, group_size=1, bias=True,
              activation="Relu", residual=True, threads=2, size=size, runs=4)


@pytest.mark.parametrize("size, cin", [([4, 4], 40), ([8, 8], 24), ([3, 5], 30)])
def test_conv_channel_split(size, cin):
    # One small image on 2 threads (from the second run of a session): each thread
    # builds the whole input matrix itself (the im2col of 15-16 columns for the lanes,
    # the phase grid) and computes its share of the 70 output channels.
    conv_case(np.random.default_rng(cin), batch=1, cin=cin, cout=70, group=1, kernel=[3, 3], stride=[1, 1],
              dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=4, group_size=1, bias=True,
              activation="Relu", residual=True, threads=2, size=size, runs=3)


@pytest.mark.parametrize(
    "size, kernel, stride, pads, cout",
    [([28, 28], [3, 3], [1, 1], [1, 1, 1, 1], 64), ([29, 31], [3, 3], [1, 1], [2, 1, 0, 1], 96),
     ([28, 28], [1, 1], [1, 1], [0, 0, 0, 0], 70), ([56, 57], [1, 1], [2, 2], [0, 0, 0, 0], 40),
     ([57, 56], [3, 3], [2, 2], [1, 1, 1, 1], 64), ([16, 16], [3, 3], [2, 2], [1, 1, 1, 1], 70),
     ([12, 13], [5, 5], [1, 1], [2, 2, 2, 2], 40)],
)
def test_conv_spatial_split(size, kernel, stride, pads, cout):
    # One image on 2 threads (from the second run of a session) with at least 64 output
    # pixels on the pixel-major GEMM (8x8 after stride 2, 12x13 under a 5x5 kernel) or
    # 784 on the blocked GEMM: each thread computes a range of output rows (pixel-major,
    # from its own copy of the grid rows they read) or of pixels (blocked GEMM writing
    # the output: the 1x1 cases) for every output channel.
    conv_case(np.random.default_rng(sum(size) + cout), batch=1, cin=24, cout=cout, group=1, kernel=kernel,
              stride=stride, dilation=[1, 1], pads=pads, auto_pad="NOTSET", bits=4, group_size=1, bias=True,
              activation="Relu", residual=True, threads=2, size=size, runs=3)


@pytest.mark.parametrize("size, kernel, stride, pads, group, cout", [
    ([12, 13], [5, 5], [1, 1], [2, 2, 2, 2], 3, 42), ([16, 16], [3, 3], [2, 2], [1, 1, 1, 1], 4, 40),
    ([30, 30], [3, 3], [1, 1], [1, 1, 1, 1], 2, 30)])
def test_conv_spatial_split_grouped(size, kernel, stride, pads, group, cout):
    # The row split of a grouped convolution: group g reads its own input channels of
    # each thread's grid rows (the pixel-major GEMM forced where it would not run).
    run_with_env(
        f"t.conv_case(np.random.default_rng(7), batch=1, cin={8 * group}, cout={cout}, group={group}, "
        f"kernel={kernel}, stride={stride}, dilation=[1, 1], pads={pads}, auto_pad='NOTSET', bits=4, "
        "group_size=1, bias=True, activation='Relu', residual=True, threads=2, "
        f"size={size}, runs=3)\n",
        ONNX_CODEBOOK_PIXEL_GEMM="1",
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_many_groups(threads, batch):
    # 16 groups of 4 -> 12 channels on a 20x20 plane: the blocked GEMM, one parallel
    # loop over the groups with each group's GEMM serial inside its task.
    conv_case(np.random.default_rng(batch), batch=batch, cin=16 * 4, cout=16 * 12, group=16, kernel=[3, 3],
              stride=[1, 1], dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=4, group_size=1, bias=True,
              activation="Relu", residual=True, threads=threads, size=[20, 20])


def test_conv_pointwise_image_by_image():
    # 64 x 66 x 66 outputs per image exceed the 2^18-float grid: a 1x1 convolution then
    # reads each image of the batch in place, one GEMM per image.
    rng = np.random.default_rng(12)
    conv_case(rng, batch=2, cin=8, cout=64, group=1, kernel=[1, 1], stride=[1, 1], dilation=[1, 1],
              auto_pad="VALID", bits=4, group_size=1, bias=True, activation="Relu", residual=True, size=[66, 66])


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_batch_in_chunks(threads):
    # 12 channels of a 92x92 padded grid per image: the kernel runs the batch of 3 in
    # chunks of 2 + 1 images (its scratch grid is capped at 2^18 floats).
    rng = np.random.default_rng(11)
    conv_case(rng, batch=3, cin=8, cout=12, group=1, kernel=[3, 3], stride=[1, 1], dilation=[1, 1],
              pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=4, group_size=1, bias=True, activation="Relu",
              residual=True, threads=threads, size=[90, 90])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [1, 3, 64])
def test_conv_every_bits(bits, group_size):
    conv_case(np.random.default_rng(bits * 10 + group_size), bits=bits, group_size=group_size, cout=12, group=1)


@pytest.mark.parametrize("seed", range(24))
def test_conv_epilogue_random(seed):
    """Conv [+ B] [+ Z] -> Relu / Clip against the plain Conv, Add, Relu / Clip graph."""
    rng = np.random.default_rng(300 + seed)
    activation = ["", "Relu", "Clip"][seed % 3]
    residual = seed % 2 == 0 or activation == ""
    bounds = [(-0.5, 0.75), (0.0, 6.0), (-1e30, 0.1)][seed % 4 % 3]
    depthwise = seed % 4 == 1
    c = int(rng.integers(1, 9))
    kwargs = dict(cin=c, cout=c, group=c) if depthwise else {}
    conv_case(rng, activation=activation, bounds=bounds, residual=residual, bias=bool(seed % 5 != 0),
              threads=1 + seed % 2, **kwargs)


# Geometries that reach each kernel's own store of the epilogue: blocked GEMM, lane
# GEMM (16 columns), pixel-major, Winograd, depthwise 16 channels at a time and plane
# by plane.
EPILOGUE_PATHS = {
    "blocked-1x1": dict(batch=2, cin=40, cout=24, group=1, kernel=[1, 1], stride=[1, 1], size=[12, 12]),
    "lane-4x4": dict(batch=1, cin=48, cout=40, group=1, kernel=[3, 3], stride=[1, 1], size=[4, 4]),
    "pixel-7x7": dict(batch=1, cin=32, cout=40, group=1, kernel=[3, 3], stride=[2, 2], size=[13, 13]),
    "winograd": dict(batch=1, cin=32, cout=48, group=1, kernel=[3, 3], stride=[1, 1], size=[10, 10]),
    "depthwise-channels": dict(batch=2, cin=24, cout=24, group=24, kernel=[3, 3], stride=[1, 1], size=[9, 9]),
    "depthwise-planes": dict(batch=1, cin=4, cout=4, group=4, kernel=[3, 3], stride=[1, 1], size=[36, 36]),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("path", sorted(EPILOGUE_PATHS))
def test_conv_activations(path, activation):
    """Every activation on every store path: against the plain Conv, Add and the ONNX
    activation op(s) (Sigmoid + Mul for Silu)."""
    rng = np.random.default_rng(len(path) * 10 + len(activation))
    conv_case(rng, **EPILOGUE_PATHS[path], dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad="NOTSET", bits=4,
              group_size=1, bias=True, activation=activation, bounds=(-0.25, 0.5), residual=True,
              threads=1 + len(activation) % 2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gemm_and_conv_transpose_activations(activation):
    rng = np.random.default_rng(len(activation))
    gemm_case(rng, M=7, K=90, N=35, trans_a=False, trans_b=True, alpha=0.5, beta=1.0, c_shape=(35,), bits=4,
              group_size=1, threads=2, activation=activation)
    conv_transpose_case(rng, cin=16, cout=8, group=1, kernel=[3, 3], stride=[2, 2], activation=activation)


def test_activation_extremes():
    """Sums far outside the activations' working range (|y| up to about 3e4)
    saturate as onnxruntime's own ops do, with no NaN."""
    rng = np.random.default_rng(0)
    for activation in ACTIVATIONS:
        conv_case(rng, batch=1, cin=16, cout=16, group=1, kernel=[1, 1], stride=[1, 1], dilation=[1, 1],
                  pads=[0] * 4, auto_pad="NOTSET", bits=4, group_size=1, bias=True, activation=activation,
                  residual=True, size=[6, 6], z_scale=1e4)


@pytest.mark.parametrize("activation", ["Relu", "Clip", "Silu", "LeakyRelu"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_epilogue_large(activation, kernel):
    # several 256-deep reduction blocks: the epilogue must act on the last one only
    conv_case(np.random.default_rng(kernel), batch=2, cin=300, cout=40, group=1, kernel=[kernel, kernel],
              stride=[1, 1], dilation=[1, 1], pads=[kernel // 2] * 4, auto_pad="NOTSET", bits=4, group_size=1,
              bias=True, activation=activation, bounds=(-0.25, 0.5), residual=True, threads=2)


def fused_conv_model(attrs, x_shape, residual_shape=None):
    rng = np.random.default_rng(1)
    codebook, indices, _ = random_weight(rng, [4, 3, 3, 3], 0, 4, 1)
    ins = ["x", "w.indices", "w.codebook", "", "z"] if residual_shape else ["x", "w.indices", "w.codebook"]
    node = helper.make_node(schema.CODEBOOK_CONV, ins, ["y"], domain=schema.DOMAIN, **fused_attrs(4, [4, 3, 3, 3], 1),
                            **attrs)
    inputs = [tensor_info("x", x_shape)] + ([tensor_info("z", residual_shape)] if residual_shape else [])
    return make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      codebook_inits(codebook, indices, 4), fused=True)


@pytest.mark.parametrize("attrs", [{"activation": "relu"}, {"activation": "Swish"}, {"activation": "Gelu"},
                                   {"activation": "LeakyRelu", "activation_alpha": float("nan")},
                                   {"activation": "HardSigmoid", "activation_beta": float("nan")}])
def test_unknown_activation_fails_at_session_creation(attrs):
    model = fused_conv_model(attrs, (1, 3, 8, 8))
    options = ops.session_options(True, 1)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV}.*activation"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("z_shape", [(1, 4, 6, 5), (1, 4, 6), (2, 4, 6, 6), (1, 1, 6, 6)])
def test_residual_shape_must_match_output(z_shape):
    model = fused_conv_model({}, (1, 3, 8, 8), residual_shape=z_shape)
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32), "z": np.ones(z_shape, np.float32)}
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV}.*Z has shape"):
        run(model, feeds)


# ----------------------------------------------------------------------------- ConvTranspose


def conv_transpose_case(rng, *, spatial=2, batch=None, cin=None, cout=None, group=None, kernel=None, stride=None,
                        dilation=None, pads=None, output_padding=None, bias=None, bits=None, group_size=None,
                        size=None, activation="", threads=1, runs=1):
    """CodebookConvTranspose against onnxruntime's ConvTranspose with the decoded weight
    [cin, cout / group, k...] (codebook rows along axis 1)."""
    batch = batch or int(rng.integers(1, 3))
    group = group or int(rng.choice([1, 1, 2, 3]))
    cin = cin or group * int(rng.integers(1, 6))
    cout = cout or group * int(rng.integers(1, 5))
    kernel = kernel or [int(rng.integers(1, 5)) for _ in range(spatial)]
    stride = stride or [int(rng.integers(1, 4)) for _ in range(spatial)]
    dilation = dilation or [int(rng.integers(1, 3)) for _ in range(spatial)]
    # up to 16 pixels run as activation rows, more as a GEMM
    size = size or [int(rng.integers(1, 9 if spatial == 2 else 40)) for _ in range(spatial)]
    bits = bits or int(rng.integers(1, 9))
    group_size = group_size or int(rng.choice([1, 2, cout // group]))
    if pads is None:  # at most what keeps every output size >= 1
        pads = [int(rng.integers(0, 3)) for _ in range(2 * spatial)]
        for i in range(spatial):
            full = stride[i] * (size[i] - 1) + (kernel[i] - 1) * dilation[i] + 1
            while pads[i] + pads[spatial + i] >= full:
                pads[i if pads[i] else spatial + i] -= 1
    if output_padding is None:  # onnxruntime wants it below the stride
        output_padding = [int(rng.integers(0, stride[i])) for i in range(spatial)]
    if bias is None:
        bias = bool(rng.integers(0, 2))
    attrs = {"strides": stride, "dilations": dilation, "group": group, "kernel_shape": kernel, "pads": pads,
             "output_padding": output_padding}
    wshape = [cin, cout // group, *kernel]
    codebook, indices, weight = random_weight(rng, wshape, 1, bits, group_size)
    x = rng.standard_normal((batch, cin, *size)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    fused = helper.make_node(
        schema.CODEBOOK_CONV_TRANSPOSE, ["x", "w.indices", "w.codebook"] + (["b"] if bias else []), ["y"],
        domain=schema.DOMAIN, **attrs, **fused_attrs(bits, wshape, group_size),
        **epilogue_attrs(activation, (-0.5, 0.5)),
    )
    plain = helper.make_node("ConvTranspose", ["x", "W"] + (["b"] if bias else []), ["y"], **attrs)
    extra = [numpy_helper.from_array(b, "b")] if bias else []
    plain_nodes, clip_inits = plain_epilogue(plain, activation, (-0.5, 0.5), False)
    compare([fused], plain_nodes, {"x": x}, codebook_inits(codebook, indices, bits) + extra,
            [numpy_helper.from_array(weight, "W")] + extra + clip_inits, threads, runs)


@pytest.mark.parametrize("seed", range(40))
def test_conv_transpose2d_random(seed):
    conv_transpose_case(np.random.default_rng(seed), runs=2)


@pytest.mark.parametrize("seed", range(12))
def test_conv_transpose1d_random(seed):
    conv_transpose_case(np.random.default_rng(100 + seed), spatial=1)


@pytest.mark.parametrize("bits", range(1, 9))
def test_conv_transpose_every_bits(bits):
    conv_transpose_case(np.random.default_rng(bits), bits=bits, cin=24, cout=10, group=1, group_size=3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel, stride, pads, output_padding, size", [
    ([2, 2], [2, 2], [0, 0, 0, 0], [0, 0], [16, 16]),   # UNet upsampling
    ([4, 4], [2, 2], [1, 1, 1, 1], [0, 0], [9, 12]),    # DCGAN
    ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1], [14, 14]),   # "same" x2 upsampling
    ([3, 3], [1, 1], [1, 1, 1, 1], [0, 0], [40, 40]),   # more pixels than one GEMM chunk
])
def test_conv_transpose_decoder_layers(kernel, stride, pads, output_padding, size, threads):
    conv_transpose_case(np.random.default_rng(7), batch=2, cin=64, cout=48, group=1, kernel=kernel, stride=stride,
                        dilation=[1, 1], pads=pads, output_padding=output_padding, size=size, bits=4, group_size=1,
                        bias=True, activation="Relu", threads=threads, runs=2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size, batch, group", [([1, 1], 9, 1), ([1, 1], 20, 2), ([2, 2], 3, 1), ([4, 4], 9, 1),
                                               ([3, 5], 2, 3)])
def test_conv_transpose_small_inputs_across_the_batch(size, batch, group, threads):
    # inputs of <= 16 pixels put the images of the batch side by side (as activation
    # rows, in the vector lanes or as one GEMM, by how many columns that makes)
    conv_transpose_case(np.random.default_rng(batch), batch=batch, cin=24, cout=18, group=group, kernel=[4, 4],
                        stride=[2, 2], dilation=[1, 1], pads=[1, 1, 1, 1], output_padding=[0, 0], size=size,
                        bits=4, group_size=2, bias=True, activation="Relu", threads=threads, runs=2)


def test_conv_transpose_grouped_shares_codebooks_across_groups():
    # the codebook rows follow the output channels of one group (axis 1 of W)
    conv_transpose_case(np.random.default_rng(3), cin=12, cout=8, group=4, kernel=[3, 3], stride=[2, 2],
                        bits=3, group_size=1, activation="Clip")


@pytest.mark.parametrize("attr", [{"auto_pad": "SAME_UPPER"}, {"output_shape": [9, 9]}])
def test_conv_transpose_rejects_implicit_padding(attr):
    rng = np.random.default_rng(4)
    codebook, indices, _ = random_weight(rng, [4, 3, 3, 3], 1, 4, 1)
    node = helper.make_node(schema.CODEBOOK_CONV_TRANSPOSE, ["x", "w.indices", "w.codebook"], ["y"],
                            domain=schema.DOMAIN, strides=[2, 2], **attr, **fused_attrs(4, [4, 3, 3, 3], 1))
    model = make_model([node], [tensor_info("x", (1, 4, 4, 4))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       codebook_inits(codebook, indices, 4), fused=True)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV_TRANSPOSE}.*explicit pads"):
        run(model, {"x": np.ones((1, 4, 4, 4), np.float32)})


@pytest.mark.parametrize("case, message", [
    ("channels", "channels"), ("index", "out of range"), ("codebook", "codebook"), ("group", "group"),
    ("pads", "non-positive output size"),
])
def test_conv_transpose_bad_model_fails_cleanly(case, message):
    rng = np.random.default_rng(5)
    wshape = [6, 3, 2, 2]
    codebook, indices, _ = random_weight(rng, wshape, 1, 4, 1, k=5)
    attrs = {"strides": [2, 2], "group": 1}
    x_shape = (1, 6, 3, 3)
    if case == "channels":
        x_shape = (1, 4, 3, 3)
    elif case == "index":
        indices.flat[-1] = 6
    elif case == "codebook":
        codebook = codebook[:2]
    elif case == "group":
        attrs["group"] = 4
    elif case == "pads":
        attrs["pads"] = [3, 0, 4, 0]
    node = helper.make_node(schema.CODEBOOK_CONV_TRANSPOSE, ["x", "w.indices", "w.codebook"], ["y"],
                            domain=schema.DOMAIN, **attrs, **fused_attrs(4, wshape, 1))
    model = make_model([node], [tensor_info("x", x_shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       codebook_inits(codebook, indices, 4), fused=True)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV_TRANSPOSE}.*{message}"):
        run(model, {"x": np.ones(x_shape, np.float32)})


def test_conv_transpose_output_shape_is_inferred():
    rng = np.random.default_rng(6)
    codebook, indices, _ = random_weight(rng, [4, 3, 3, 2], 1, 4, 1)
    node = helper.make_node(schema.CODEBOOK_CONV_TRANSPOSE, ["x", "w.indices", "w.codebook"], ["y"],
                            domain=schema.DOMAIN, strides=[2, 3], pads=[1, 0, 1, 1], output_padding=[1, 0], group=2,
                            **fused_attrs(4, [4, 3, 3, 2], 1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 4])
    # 2 * 4 + 1 + 3 - 2 = 10; 3 * 3 + 0 + 2 - 1 = 10; 3 output channels per group
    assert inferred_shape(node, [x], codebook_inits(codebook, indices, 4)) == ["n", 6, 10, 10]


# ----------------------------------------------------------------------------- Gemm


def gemm_case(rng, *, M, K, N, trans_a, trans_b, alpha, beta, c_shape, bits, group_size, threads=1,
              activation="", bounds=(-0.5, 0.75)):
    wshape = [N, K] if trans_b else [K, N]
    axis = 0 if trans_b else 1
    codebook, indices, weight = random_weight(rng, wshape, axis, bits, group_size)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    attrs = {"alpha": alpha, "beta": beta, "transA": int(trans_a), "transB": int(trans_b)}
    extra, ins = [], []
    if c_shape is not None:
        extra = [numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "c")]
        ins = ["c"]
    fused = helper.make_node(
        schema.CODEBOOK_GEMM, ["a", "w.indices", "w.codebook", *ins], ["y"], domain=schema.DOMAIN,
        **attrs, **fused_attrs(bits, wshape, group_size), **epilogue_attrs(activation, bounds),
    )
    plain = helper.make_node("Gemm", ["a", "W", *ins], ["y"], **attrs)
    plain_nodes, clip_inits = plain_epilogue(plain, activation, bounds, False)
    compare([fused], plain_nodes, {"a": a}, codebook_inits(codebook, indices, bits) + extra,
            [numpy_helper.from_array(weight, "W")] + extra + clip_inits, threads)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    M=st.sampled_from([1, 2, 5, 8, 9, 31]),
    K=st.integers(1, 300),
    N=st.integers(1, 150),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, 0.25]),
    c_kind=st.sampled_from(["none", "scalar", "n", "1n", "m1", "mn"]),
    bits=st.integers(1, 8),
    group_size=st.sampled_from([1, 2, 5, 1000]),
    seed=st.integers(0, 2**16),
)
def test_gemm_random(M, K, N, trans_a, trans_b, alpha, beta, c_kind, bits, group_size, seed):
    c_shape = {"none": None, "scalar": (), "n": (N,), "1n": (1, N), "m1": (M, 1), "mn": (M, N)}[c_kind]
    gemm_case(np.random.default_rng(seed), M=M, K=K, N=N, trans_a=trans_a, trans_b=trans_b, alpha=alpha,
              beta=beta, c_shape=c_shape, bits=bits, group_size=group_size, threads=1 + seed % 2)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [1, 4, 40])
def test_gemm_every_bits(bits, M):
    gemm_case(np.random.default_rng(bits + M), M=M, K=520, N=70, trans_a=False, trans_b=bool(bits % 2),
              alpha=1.0, beta=1.0, c_shape=(70,), bits=bits, group_size=3, threads=2)


@pytest.mark.parametrize("M", range(1, 9))
def test_gemm_few_rows(M):
    # Up to 8 activation rows run as weight rows against all of them: with AVX-512
    # several weight rows per step (13 rows: a remainder), more than 5 activation rows
    # in passes of 4, and K=72 ends in a chunk of 8 weights.
    gemm_case(np.random.default_rng(M), M=M, K=72, N=13, trans_a=M % 2 == 0, trans_b=M % 3 != 0, alpha=0.5,
              beta=1.0, c_shape=(M, 13), bits=1 + M % 4, group_size=2, threads=1 + M % 2, activation="Relu")


@pytest.mark.parametrize("activation, bounds", [("Relu", None), ("Clip", (-0.5, 0.75)), ("Clip", (0.0, 6.0))])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_gemm_epilogue(activation, bounds, M):
    gemm_case(np.random.default_rng(M), M=M, K=600, N=50, trans_a=M == 5, trans_b=M != 40, alpha=0.5, beta=1.0,
              c_shape=(50,), bits=4, group_size=1, threads=2, activation=activation, bounds=bounds)


# ----------------------------------------------------------------------------- MatMul


@pytest.mark.parametrize(
    "a_shape", [(37,), (1, 37), (5, 37), (3, 4, 37), (2, 3, 10, 37), (200, 37), (2, 1, 37)]
)
@pytest.mark.parametrize("bits", [2, 4, 7])
def test_matmul(a_shape, bits):
    rng = np.random.default_rng(len(a_shape) * 10 + bits)
    activation = ["", "Relu", "Clip"][(len(a_shape) + bits) % 3]
    K, N = 37, 45
    group_size = int(rng.choice([1, 4, N]))
    codebook, indices, weight = random_weight(rng, [K, N], 1, bits, group_size)
    a = rng.standard_normal(a_shape).astype(np.float32)
    bounds = (-0.5, 0.75)
    fused = helper.make_node(schema.CODEBOOK_MATMUL, ["a", "w.indices", "w.codebook"], ["y"],
                             domain=schema.DOMAIN, **fused_attrs(bits, [K, N], group_size),
                             **epilogue_attrs(activation, bounds))
    plain = helper.make_node("MatMul", ["a", "W"], ["y"])
    plain_nodes, clip_inits = plain_epilogue(plain, activation, bounds, False)
    compare([fused], plain_nodes, {"a": a}, codebook_inits(codebook, indices, bits),
            [numpy_helper.from_array(weight, "W")] + clip_inits, threads=2)


# ----------------------------------------------------------------------------- bad models


def bad_gemm(indices_bytes=None, codebook=None, bits=4, k=5, shape=(6, 7), index_value=None,
             constant=True):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, k, size=shape).astype(np.uint8)
    if index_value is not None:
        indices.flat[17] = index_value
    packed = pack_bits(indices, bits if 1 <= bits <= 8 else 4) if indices_bytes is None else indices_bytes
    if codebook is None:
        codebook = rng.standard_normal((shape[1], k)).astype(np.float32)
    node = helper.make_node(schema.CODEBOOK_GEMM, ["a", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            **fused_attrs(bits, shape, 1))
    inits = [numpy_helper.from_array(codebook, "w.codebook")]
    inputs = [tensor_info("a", (2, shape[0]))]
    if constant:
        inits.append(numpy_helper.from_array(packed, "w.indices"))
    else:
        inputs.append(helper.make_tensor_value_info("w.indices", TensorProto.UINT8, [packed.size]))
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
                       fused=True)
    feeds = {"a": np.ones((2, shape[0]), np.float32)}
    if not constant:
        feeds["w.indices"] = packed
    return model, feeds


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index_value": 5}, "out of range"),
        ({"index_value": 15}, "out of range"),
        ({"indices_bytes": np.zeros(20, np.uint8)}, "bytes"),
        ({"indices_bytes": np.zeros(22, np.uint8)}, "bytes"),
        ({"codebook": np.zeros((6, 5), np.float32)}, "codebook"),
        ({"codebook": np.zeros((7, 17), np.float32)}, "codebook"),
        ({"codebook": np.zeros((7,), np.float32)}, "codebook"),
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"constant": False}, "constant"),
    ],
)
def test_bad_model_fails_cleanly(kwargs, message):
    model, feeds = bad_gemm(**kwargs)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_GEMM}.*{message}"):
        run(model, feeds)


@pytest.mark.parametrize("weight_shape", [[2**31, 2**31, 2**31], [6, -7], [6, 7, 1]])
def test_bad_weight_shape_fails_cleanly(weight_shape):
    model, feeds = bad_gemm()
    attr = next(a for a in model.graph.node[0].attribute if a.name == "weight_shape")
    attr.ints[:] = weight_shape
    with pytest.raises(Exception, match=schema.CODEBOOK_GEMM):
        run(model, feeds)


def test_bad_conv_input_channels():
    rng = np.random.default_rng(1)
    codebook, indices, _ = random_weight(rng, [4, 3, 3, 3], 0, 4, 1)
    node = helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            **fused_attrs(4, [4, 3, 3, 3], 1))
    model = make_model([node], [tensor_info("x", (1, 5, 8, 8))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       codebook_inits(codebook, indices, 4), fused=True)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV}.*channels"):
        run(model, {"x": np.ones((1, 5, 8, 8), np.float32)})


@pytest.mark.parametrize("wshape", [[4, 8, 1, 1], [6, 3, 3, 3]])
def test_bad_conv_index_fails_cleanly(wshape):
    # [4, 8, 1, 1]: rows of 8 indices, read in place from the initializer; [6, 3, 3, 3]: re-laid out
    rng = np.random.default_rng(2)
    codebook, indices, _ = random_weight(rng, wshape, 0, 4, 1, k=5)
    indices.flat[-1] = 7
    node = helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            **fused_attrs(4, wshape, 1))
    x_shape = (1, wshape[1], 5, 5)
    model = make_model([node], [tensor_info("x", x_shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       codebook_inits(codebook, indices, 4), fused=True)
    with pytest.raises(Exception, match=f"{schema.CODEBOOK_CONV}.*out of range"):
        run(model, {"x": np.ones(x_shape, np.float32)})


def inferred_shape(node, inputs, inits):
    """The output shape onnxruntime infers for `node` (output y declared without one)."""
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
                       fused=True)
    sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(True, 1),
                                providers=["CPUExecutionProvider"])
    return sess.get_outputs()[0].shape


def test_output_shapes_are_inferred():
    # onnxruntime's layout passes need the shapes after our ops (its NCHWc MaxPool
    # needs the channel count): symbolic dims pass through, spatial sizes follow the
    # Conv attributes, unknown stays unknown.
    rng = np.random.default_rng(5)
    codebook, indices, _ = random_weight(rng, [6, 2, 3, 2], 0, 4, 1)
    inits = codebook_inits(codebook, indices, 4)
    conv = helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2], group=2, **fused_attrs(4, [6, 2, 3, 2], 1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, None])
    shape = inferred_shape(conv, [x], inits)
    assert shape[:3] == ["n", 6, 5] and isinstance(shape[3], str) and shape[3] != "n"  # unknown, named
    same = helper.make_node(schema.CODEBOOK_CONV, ["x", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            strides=[2, 3], auto_pad="SAME_UPPER", group=2, **fused_attrs(4, [6, 2, 3, 2], 1))
    assert inferred_shape(same, [tensor_info("x", (1, 4, 9, 10))], inits) == [1, 6, 5, 4]
    # width 1 padded to 2 is narrower than the dilated kernel (3): that size stays
    # unknown, the run reports it
    small = [tensor_info("x", (1, 4, 1, 1))]
    shape = inferred_shape(conv, small, inits)
    assert shape[:3] == [1, 6, 1] and isinstance(shape[3], str)
    model = make_model([conv], small, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, fused=True)
    with pytest.raises(Exception, match="smaller than the dilated kernel"):
        run(model, {"x": np.ones((1, 4, 1, 1), np.float32)})

    codebook, indices, _ = random_weight(rng, [5, 7], 0, 3, 1)
    inits = codebook_inits(codebook, indices, 3)
    gemm = helper.make_node(schema.CODEBOOK_GEMM, ["a", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            transA=1, transB=1, **fused_attrs(3, [5, 7], 1))
    assert inferred_shape(gemm, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [7, "m"])], inits) == ["m", 5]
    codebook, indices, _ = random_weight(rng, [5, 7], 1, 3, 1)
    inits = codebook_inits(codebook, indices, 3)
    matmul = helper.make_node(schema.CODEBOOK_MATMUL, ["a", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                              **fused_attrs(3, [5, 7], 1))
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 3, 5])
    assert inferred_shape(matmul, [a], inits) == ["b", 3, 7]


def test_session_helper_registers_library():
    rng = np.random.default_rng(3)
    codebook, indices, weight = random_weight(rng, [8, 4], 1, 3, 1)
    node = helper.make_node(schema.CODEBOOK_MATMUL, ["a", "w.indices", "w.codebook"], ["y"], domain=schema.DOMAIN,
                            **fused_attrs(3, [8, 4], 1))
    model = make_model([node], [tensor_info("a", (2, 8))], [tensor_info("y", (2, 4))],
                       codebook_inits(codebook, indices, 3), fused=True)
    onnx.checker.check_model(model)
    a = rng.standard_normal((2, 8)).astype(np.float32)
    got = ops.session(model, threads=1).run(None, {"a": a})[0]
    np.testing.assert_allclose(got, a @ weight, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize(
    "kernels",
    ["ONNX_CODEBOOK_PORTABLE", "ONNX_CODEBOOK_NO_AVX512", "ONNX_CODEBOOK_PIXEL_GEMM", "ONNX_CODEBOOK_NO_VBMI",
     "ONNX_CODEBOOK_PIXEL_TILES=rows", "ONNX_CODEBOOK_PIXEL_TILES=images", "ONNX_CODEBOOK_WINOGRAD=0",
     "ONNX_CODEBOOK_SPARSE=1", "ONNX_CODEBOOK_SPARSE=0"],
)
def test_fallback_kernels_in_subprocess(kernels):
    """The portable and the AVX2-only kernels (transposed convolutions included), the
    pixel-major convolution for every geometry, the PDEP index decoding where the CPU has VBMI, each tiling of the
    pixel-major convolution, the direct paths where Winograd would run, and the sparse-column GEMM for every
    few-column convolution or for none (forced by environment variables), give the same results."""
    body = (
        "for seed in range(6):\n"
        "    t.conv_case(np.random.default_rng(seed))\n"
        "    t.conv_case(np.random.default_rng(seed), cin=4, cout=4, group=4, kernel=[3, 3],\n"
        "                activation=['Relu', 'Clip'][seed % 2], residual=True)\n"
        "    t.conv_case(np.random.default_rng(seed), activation='Clip', residual=bool(seed % 2))\n"
        "    for activation in t.ACTIVATIONS[seed % 2::2]:\n"
        "        t.conv_case(np.random.default_rng(seed), batch=2, cin=12, cout=12, group=[1, 12][seed % 2],\n"
        "                    kernel=[3, 3], stride=[1, 1], dilation=[1, 1], activation=activation, residual=True)\n"
        "    t.gemm_case(np.random.default_rng(seed), M=1 + seed * 3, K=77, N=33, trans_a=bool(seed % 2),\n"
        "                trans_b=bool(seed % 3), alpha=0.5, beta=1.0, c_shape=(33,), bits=1 + seed, group_size=2,\n"
        "                activation=['', 'Relu', 'Clip'][seed % 3])\n"
        "    t.gemm_case(np.random.default_rng(seed), M=9 + 5 * seed, K=40, N=37, trans_a=False, trans_b=True,\n"
        "                alpha=1.0, beta=0.0, c_shape=None, bits=4, group_size=1, activation='Relu')\n"
        "    t.conv_transpose_case(np.random.default_rng(seed), size=[2 + seed, 9 - seed])\n"
        "    t.conv_transpose_case(np.random.default_rng(seed), cin=24, cout=16, group=1 + seed % 2,\n"
        "                          size=[1 + seed % 3, 5], threads=2)\n"
        "    t.conv_case(np.random.default_rng(seed), batch=1 + seed % 4, cin=64, cout=40, group=1 + seed % 2,\n"
        "                kernel=[3, 3], stride=[1, 1], dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad='NOTSET',\n"
        "                bits=1 + seed % 4, group_size=1, bias=True, activation='Relu', size=[2, 2])\n"
        "t.conv_case(np.random.default_rng(8), batch=2, cin=40, cout=100, group=1, kernel=[3, 3], stride=[1, 1],\n"
        "            dilation=[1, 1], pads=[1, 1, 1, 1], auto_pad='NOTSET', bits=4, group_size=1, bias=True,\n"
        "            activation='Relu', residual=True, threads=2)\n"
        "for case in t.PADDED_TAP_CASES:\n"
        "    t.padded_tap_case(*case, threads=2)\n"
        "for case in t.WINOGRAD_CASES[:-1]:\n"
        "    t.winograd_case(*case, threads=2)\n"
        "for case in t.SPARSE_CASES:\n"
        "    t.sparse_case(*case, threads=2)\n"
        "t.test_conv_sparse_columns_not_finite()\n"
    )
    name, _, value = kernels.partition("=")
    env = {name: value or "1"}
    if name == "ONNX_CODEBOOK_PIXEL_TILES":
        env["ONNX_CODEBOOK_PIXEL_GEMM"] = "1"
    run_with_env(body, **env)
