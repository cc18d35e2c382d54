"""The compression pass: every op kind, granularity and bit-width, on small models run in onnxruntime."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_codebook as oc
from onnx_codebook import io as oc_io
from onnx_codebook.analysis import decompress_model
from onnx_codebook.config import CompressConfig, LayerSettings
from onnx_codebook.errors import CodebookWarning, ConfigError, NoEligibleLayerError
from onnx_codebook.pipeline import compress_model
from onnx_codebook.schema import METADATA_KEY

from conftest import (
    conv_model,
    conv_transpose_model,
    constant_node_model,
    default_opset,
    feeds_for,
    gemm_model,
    init,
    initializer_names,
    make_model,
    matmul_model,
    randn,
    rel_rms,
    run,
    shared_weight_model,
    small_cnn,
)

INDEX_TYPE = {1: TensorProto.UINT2, 2: TensorProto.UINT2, 3: TensorProto.UINT4, 4: TensorProto.UINT4,
              **{b: TensorProto.UINT8 for b in range(5, 9)}}


def max_error(bits: int, layers: int = 1) -> float:
    """Allowed relative RMS output error at ``bits`` for Gaussian weights.

    k-means on a Gaussian gains ~6 dB per bit (relative error ~1.1-1.6 * 2^-bits
    per layer measured on these models); 2 * 2^-bits per compressed layer on the
    path leaves headroom without hiding a broken encoding (a wrong index order or
    offset gives errors near 1.4 at any bits).
    """
    return 2.0 * layers * 2.0**-bits


def compress(model, **options):
    """Compress with ``min_elements=0`` unless given; return the CompressResult."""
    options.setdefault("min_elements", 0)
    return oc.compress_with_report(model, **options)


def check_runs_close(original, compressed, rng, bits, batch=2, layers=1):
    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version <= 13
    feeds = feeds_for(original, rng, batch)
    want, got = run(original, feeds), run(compressed, feeds)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape
        assert rel_rms(w, g) <= max_error(bits, layers)
    return want, got


def index_initializers(model):
    return [t for t in model.graph.initializer if t.name.endswith(".indices")]


# --------------------------------------------------------------------------- op kinds


OP_MODELS = {
    "conv": lambda rng: conv_model(rng, 16, 16),
    "grouped_conv": lambda rng: conv_model(rng, 16, 16, group=4),
    "depthwise_conv": lambda rng: conv_model(rng, 32, 32, group=32),
    "conv_1x1_no_bias": lambda rng: conv_model(rng, 24, 16, k=1, bias=False),
    "conv_transpose": conv_transpose_model,
    "gemm_transB1": lambda rng: gemm_model(rng, trans_b=1),
    "gemm_transB0": lambda rng: gemm_model(rng, trans_b=0),
    "matmul_2d": matmul_model,
    "matmul_batched_lhs": lambda rng: matmul_model(rng, batch_shape=(2, 3)),
    "constant_node_weight": constant_node_model,
}


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("kind", sorted(OP_MODELS))
def test_every_op_kind_and_granularity(kind, granularity, rng):
    model = OP_MODELS[kind](rng)
    result = compress(model, bits=4, granularity=granularity, group_size=3)
    assert [layer.name for layer in result.layers] == ["W"]
    check_runs_close(model, result.model, rng, bits=4)
    out = result.model
    # The float weight is gone (no initializer, no Constant node), indices are UINT4 with the weight's shape.
    assert "W" not in initializer_names(out)
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    (indices,) = index_initializers(out)
    assert indices.data_type == TensorProto.UINT4
    assert len(indices.raw_data) == math.ceil(math.prod(indices.dims) / 2)
    layer = result.layers[0]
    channels = layer.shape[{"conv_transpose": 1, "gemm_transB0": 1, "matmul_2d": 1, "matmul_batched_lhs": 1}.get(kind, 0)]
    if granularity == "tensor":
        assert layer.groups == 1
    elif granularity == "channel" and layer.note == "":
        assert (layer.group_size, layer.groups) == (1, channels)
    elif granularity == "group":
        assert layer.groups == math.ceil(channels / layer.group_size)


def test_channel_codebooks_follow_the_op_channel_axis(rng):
    """ConvTranspose W is [C_in, C_out, k, k] and Gemm transB=0 W is [K, N]: the codebook rows
    must follow C_out / N, so a weight whose output channels take one value each is exact with 1 bit."""
    for model, axis in ((conv_transpose_model(rng), 1), (gemm_model(rng, trans_b=0), 1), (gemm_model(rng), 0),
                        (matmul_model(rng), 1), (conv_model(rng, 16, 16), 0)):
        w = numpy_helper.to_array(model.graph.initializer[0]).copy()
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        levels = np.arange(w.shape[axis], dtype=np.float32).reshape(shape) / 10 + 0.05
        w = (np.sign(w) * levels).astype(np.float32)  # each output channel: {-l_c, +l_c}
        model.graph.initializer[0].CopyFrom(init("W", w))
        result = compress(model, bits=1, granularity="channel")
        want, got = check_runs_close(model, result.model, rng, bits=1)
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bit_width(bits, granularity, rng):
    model = conv_model(rng, 16, 16)
    result = compress(model, bits=bits, granularity=granularity, group_size=5)  # 16 channels: groups 5,5,5,1
    check_runs_close(model, result.model, rng, bits)
    (layer,) = result.layers
    assert layer.bits == bits
    assert layer.bytes_stored < layer.bytes_fp32
    assert layer.codebook_entries <= layer.groups * 2**bits
    (indices,) = index_initializers(result.model)
    assert indices.data_type == INDEX_TYPE[bits]
    assert list(indices.dims) == [16, 16, 3, 3]
    # Opset: UINT2 needs 25, UINT4 21; the input model is at 21.
    assert default_opset(result.model) == (25 if bits <= 2 else 21)


@pytest.mark.parametrize("bits, opset", [(1, 25), (2, 25), (3, 21), (4, 21), (5, 13), (8, 13)])
def test_opset_13_model_is_raised_only_as_needed(bits, opset, rng):
    model = small_cnn(rng, opset=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conversion must succeed without a fallback warning
        result = compress(model, bits=bits, granularity="tensor")
    assert default_opset(result.model) == opset
    assert result.warnings == []
    assert 7 <= result.model.ir_version <= 13
    check_runs_close(model, result.model, rng, bits, batch=3, layers=3)
    # Same clustering as the same model at opset 21: identical outputs.
    modern = compress(small_cnn(np.random.default_rng(0), opset=21), bits=bits, granularity="tensor").model
    model21 = small_cnn(np.random.default_rng(0), opset=21)
    model13 = small_cnn(np.random.default_rng(0), opset=13)
    old = compress(model13, bits=bits, granularity="tensor").model
    feeds = feeds_for(model21, rng, 3)
    np.testing.assert_allclose(run(old, feeds)[0], run(modern, feeds)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_few_distinct_values_are_reproduced_exactly(bits, rng):
    """bits >= log2(distinct values) -> lossless weights and identical outputs."""
    palette = np.linspace(-0.5, 0.4, 2**bits).astype(np.float32)
    w = palette[rng.integers(0, palette.size, (16, 16, 3, 3))]
    model = conv_model(rng, weight=w)
    for granularity in ("tensor", "channel"):
        result = compress(model, bits=bits, granularity=granularity)
        assert result.layers[0].sqnr_db == math.inf
        feeds = feeds_for(model, rng)
        np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_shared_weight_is_encoded_once(rng):
    model = shared_weight_model(rng)
    result = compress(model, bits=4, granularity="channel")
    assert len(result.layers) == 1
    assert len(index_initializers(result.model)) == 1
    assert sum(t.name.endswith(".codebook") for t in result.model.graph.initializer) == 1
    assert sum(n.op_type == "Gather" for n in result.model.graph.node) == 1
    check_runs_close(model, result.model, rng, bits=4)


def test_shared_weight_with_conflicting_channel_axes_gets_one_codebook(rng):
    """W used as Gemm transB=1 (channels on axis 0) and as MatMul RHS (axis 1): a single tensor codebook."""
    w = randn(rng, 32, 32)
    nodes = [helper.make_node("Gemm", ["A", "W"], ["H"], name="fc", transB=1),
             helper.make_node("MatMul", ["H", "W"], ["Y"], name="mm")]
    model = make_model(nodes, [("A", [2, 32])], [("Y", [2, 32])], [init("W", w)])
    result = compress(model, bits=4, granularity="channel")
    assert result.layers[0].groups == 1
    assert len(index_initializers(result.model)) == 1
    check_runs_close(model, result.model, rng, bits=4)


def test_min_elements_skips_small_weights(rng):
    model = small_cnn(rng)  # conv1 144, conv2 4608, fc 320 elements
    result = compress(model, bits=4, min_elements=1000)
    assert [layer.name for layer in result.layers] == ["conv2.weight"]
    skipped = {s.name: s.reason for s in result.skipped}
    assert set(skipped) == {"conv1.weight", "fc.weight"}
    assert "min-elements" in skipped["conv1.weight"]
    kept = {t.name: t for t in result.model.graph.initializer}
    original = {t.name: t for t in model.graph.initializer}
    for name in ("conv1.weight", "fc.weight"):
        assert kept[name] == original[name]
    with pytest.raises(NoEligibleLayerError, match="min-elements"):
        compress(model, bits=4, min_elements=10_000)


def test_ops_option_restricts_op_types(rng):
    model = small_cnn(rng)
    result = compress(model, bits=4, ops="Gemm")
    assert [layer.op for layer in result.layers] == ["Gemm"]
    result = compress(model, bits=4, ops=("Conv",))
    assert {layer.op for layer in result.layers} == {"Conv"}


def test_int8_weights_are_left_alone(rng):
    """Already-quantized weights: int8 behind DequantizeLinear (computed at run time) and an int32 MatMul."""
    q = rng.integers(-100, 100, (16, 16, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], name="dq"),
             helper.make_node("Conv", ["X", "Wd"], ["H"], name="qconv", pads=[1] * 4),
             helper.make_node("Conv", ["H", "W"], ["Y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [("X", [1, 16, 4, 4])], [("Y", [1, 16, 4, 4])],
                       [init("Wq", q), init("s", np.float32(0.01)), init("W", randn(rng, 16, 16, 3, 3))])
    result = compress(model, bits=4)
    assert [layer.name for layer in result.layers] == ["W"]
    assert any(s.name == "qconv" and "run time" in s.reason for s in result.skipped)
    kept = {t.name: t for t in result.model.graph.initializer}
    assert kept["Wq"] == model.graph.initializer[0]
    check_runs_close(model, result.model, rng, bits=4)

    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")]
    int_model = make_model(nodes, [helper.make_tensor_value_info("A", TensorProto.INT32, [2, 64])],
                           [helper.make_tensor_value_info("Y", TensorProto.INT32, [2, 8])],
                           [init("W", rng.integers(-5, 5, (64, 8)).astype(np.int32))])
    with pytest.raises(NoEligibleLayerError, match="int32"):
        compress(int_model, bits=4)


def test_biases_names_metadata_and_io_are_preserved(rng):
    model = small_cnn(rng)
    model.doc_string = "doc of the model"
    model.graph.doc_string = "doc of the graph"
    model.model_version = 7
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    result = compress(model, bits=4, granularity="channel")
    out = result.model
    assert {layer.name for layer in result.layers} == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert (out.doc_string, out.graph.doc_string, out.model_version) == (model.doc_string, model.graph.doc_string, 7)
    assert (out.producer_name, out.graph.name) == (model.producer_name, model.graph.name)
    props = {p.key: p.value for p in out.metadata_props}
    assert props["author"] == "tests" and props["license"] == "MIT"
    assert METADATA_KEY in props
    assert list(out.graph.input) == list(model.graph.input)
    assert list(out.graph.output) == list(model.graph.output)
    # Biases: byte-identical initializers.
    before = {t.name: t for t in model.graph.initializer}
    after = {t.name: t for t in out.graph.initializer}
    for bias in ("conv1.bias", "conv2.bias", "fc.bias"):
        assert after[bias] == before[bias]
    # Every original node keeps its name, op and inputs (the decoded weight takes over the weight's name).
    by_name = {n.name: n for n in out.graph.node}
    for node in model.graph.node:
        assert by_name[node.name].op_type == node.op_type
        assert list(by_name[node.name].input) == list(node.input)
        assert list(by_name[node.name].output) == list(node.output)
    check_runs_close(model, out, rng, bits=4, batch=3, layers=3)


def test_input_model_is_not_modified(rng):
    model = small_cnn(rng)
    snapshot = model.SerializeToString()
    compress(model, bits=3)
    assert model.SerializeToString() == snapshot


def test_if_subgraph_weights_are_compressed(rng):
    def branch(name, w):
        return helper.make_graph(
            [helper.make_node("MatMul", ["A", f"{name}_W"], [f"{name}_Y"], name=f"{name}_mm")], name, [],
            [helper.make_tensor_value_info(f"{name}_Y", TensorProto.FLOAT, [2, 32])],
            initializer=[init(f"{name}_W", w)],
        )

    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=branch("then", randn(rng, 64, 32)),
                              else_branch=branch("else", randn(rng, 64, 32)))]
    model = make_model(nodes, [("A", [2, 64]), cond], [("Y", [2, 32])])
    result = compress(model, bits=4)
    assert sorted(layer.name for layer in result.layers) == ["else_W", "then_W"]
    onnx.checker.check_model(result.model, full_check=True)
    if_node = result.model.graph.node[0]
    for attr in if_node.attribute:
        names = [t.name for t in attr.g.initializer]
        assert not any(n.endswith("_W") for n in names) and any(n.endswith(".indices") for n in names)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    for flag in (True, False):
        feeds = {"A": a, "cond": np.array(flag)}
        assert rel_rms(run(model, feeds)[0], run(result.model, feeds)[0]) <= max_error(4)


def test_float16_codebook(rng):
    model = small_cnn(rng)
    result = compress(model, bits=4, codebook_dtype="float16")
    codebooks = [t for t in result.model.graph.initializer if t.name.endswith(".codebook")]
    assert codebooks and all(t.data_type == TensorProto.FLOAT16 for t in codebooks)
    # Codebook bytes in the report are the fp16 ones.
    for layer in result.layers:
        assert layer.codebook_bytes == layer.groups * 2**4 * 2
    check_runs_close(model, result.model, rng, bits=4, batch=3, layers=3)


def test_float16_weights_stay_float16(rng):
    model = float16_matmul_model(rng)
    result = compress(model, bits=4)
    onnx.checker.check_model(result.model, full_check=True)
    a = rng.standard_normal((2, 32)).astype(np.float16)
    want, got = run(model, {"A": a})[0], run(result.model, {"A": a})[0]
    assert got.dtype == np.float16
    assert rel_rms(want.astype(np.float32), got.astype(np.float32)) <= max_error(4)


def float16_matmul_model(rng):
    w = randn(rng, 32, 48).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [2, 32])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [2, 48])], [init("W", w)])


@pytest.mark.parametrize("fmt", ["standard", "fused"])
def test_float16_weights_report_their_own_bytes(fmt, rng):
    # The ratio is against the weight as the model stores it: 2 bytes per float16 value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CodebookWarning)  # fused: the layer keeps the standard decode
        result = compress(float16_matmul_model(rng), bits=4, format=fmt)
    (layer,) = result.layers
    assert layer.bytes_original == 32 * 48 * 2 and layer.bytes_fp32 == 32 * 48 * 4
    assert layer.ratio == pytest.approx(layer.bytes_original / layer.bytes_stored)
    assert result.summary()["weight_bytes_before"] == 32 * 48 * 2


def test_fused_format_says_which_layers_keep_the_standard_decode(rng):
    # The kernels compute in float32: a float16 layer keeps Cast + Gather, and the user is told.
    with pytest.warns(CodebookWarning, match=r"1 of 1 layers keep the standard decode .*W \(float16 weight\)"):
        result = compress(float16_matmul_model(rng), bits=4, format="fused")
    assert not any(n.domain for n in result.model.graph.node)
    assert any("W (float16 weight)" in w for w in result.warnings)
    assert not any("standard decode" in w for w in compress(small_cnn(rng), bits=4, format="fused").warnings)


def cast_weight_model(rng, *, also_read=False, constant=False):
    """X[N,8,6,6] -> Conv(Cast(W16 to float)) -> Y: a float16 weight as mixed-precision exports store it;
    ``also_read``: the cast weight also feeds an Identity output; ``constant``: W16 is the
    output of a Constant node, not an initializer."""
    w = (randn(rng, 24, 8, 3, 3) * 0.3).astype(np.float16)
    nodes = [helper.make_node("Cast", ["W16"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["X", "Wf"], ["Y"], name="conv", pads=[1, 1, 1, 1])]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W16"], value=init("W16", w)))
    outputs = [("Y", [2, 24, 6, 6])]
    if also_read:
        nodes.append(helper.make_node("Identity", ["Wf"], ["Wcopy"]))
        outputs.append(("Wcopy", [24, 8, 3, 3]))
    return make_model(nodes, [("X", [2, 8, 6, 6])], outputs, [] if constant else [init("W16", w)])


@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("fmt", ["standard", "fused"])
def test_float16_weight_read_through_cast_is_compressed(fmt, constant, rng):
    # onnxruntime folds the Cast at session start: the codebooks fit the float32 values it
    # computes with, the fused op reads them without the Cast, and sizes count 2 bytes each
    # (also where the float16 weight is held in a Constant node).
    model = cast_weight_model(rng, constant=constant)
    with pytest.warns(CodebookWarning, match=r"1 weight\(s\) stored as float16 / float64 and read through Cast"):
        result = compress(model, bits=4, format=fmt)
    (layer,) = result.layers
    assert layer.name == "Wf" and layer.bytes_original == 24 * 8 * 9 * 2
    ops = [n.op_type for n in result.model.graph.node]
    assert "Cast" not in ops or fmt == "standard"  # the standard decode casts its indices
    assert ("CodebookConv" in ops) == (fmt == "fused")
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds_for(model, rng, 2)
    session = oc.session(result.model, threads=1) if fmt == "fused" else None
    got = session.run(None, feeds)[0] if session else run(result.model, feeds)[0]
    assert rel_rms(run(model, feeds)[0], got) <= max_error(4)


def test_cast_weight_read_elsewhere_is_left_alone(rng):
    model = cast_weight_model(rng, also_read=True)
    with pytest.raises(NoEligibleLayerError, match="computed at run time"):
        compress(model, bits=4)


def test_stored_bytes_include_codebooks_and_offsets(rng):
    model = small_cnn(rng)
    for granularity in ("tensor", "channel", "group"):
        result = compress(model, bits=3, granularity=granularity, group_size=4)
        inits = {t.name: t for t in result.model.graph.initializer}
        for layer in result.layers:
            actual = sum(len(inits[f"{layer.name}.{part}"].raw_data)
                         for part in ("indices", "codebook", "offsets") if f"{layer.name}.{part}" in inits)
            assert layer.bytes_stored == actual
            assert layer.codebook_bytes == layer.groups * 2**3 * 4
        summary = result.summary()
        assert summary["weight_bytes_after"] == sum(layer.bytes_stored for layer in result.layers)
        assert summary["compression_ratio"] == pytest.approx(summary["weight_bytes_before"] / summary["weight_bytes_after"])


def test_depthwise_per_channel_codebooks_are_coarsened(rng):
    """Depthwise 3x3: 9 weights per channel cannot pay for a 16-entry codebook each."""
    model = conv_model(rng, 64, 64, group=64)
    result = compress(model, bits=4, granularity="channel")
    (layer,) = result.layers
    assert layer.group_size > 1
    assert "cost more than it saves" in layer.note
    assert layer.codebook_bytes + (layer.bytes_stored - layer.index_bytes - layer.codebook_bytes) \
        <= layer.bytes_fp32 - layer.index_bytes
    assert layer.bytes_stored < layer.bytes_fp32
    check_runs_close(model, result.model, rng, bits=4)


def test_a_layer_that_cannot_pay_for_its_codebook_is_skipped(rng):
    """8 bits on a 64-element weight: a 256-entry codebook alone is 4x the float weight."""
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")]
    model = make_model(nodes, [("A", [2, 8])], [("Y", [2, 8])], [init("W", randn(rng, 8, 8))])
    with pytest.raises(NoEligibleLayerError):
        compress(model, bits=8, granularity="tensor")
    big = small_cnn(rng)
    result = compress(big, bits=8, granularity="tensor")
    assert all(layer.bytes_stored < layer.bytes_fp32 for layer in result.layers)
    assert "conv1.weight" in {s.name for s in result.skipped}  # 144 weights


def test_binary_method(rng):
    model = conv_model(rng, 16, 16)
    result = compress(model, bits=1, method="binary", granularity="group", group_size=4)
    (layer,) = result.layers
    assert (layer.method, layer.groups) == ("binary", 4)
    check_runs_close(model, result.model, rng, bits=1)
    with pytest.raises(ConfigError):
        compress(model, bits=2, method="binary")


def test_per_layer_overrides(rng):
    model = small_cnn(rng)
    result = compress(model, bits=4, layers={"Gemm": {"bits": 8}, "conv2.weight": {"bits": 2, "granularity": "tensor"}})
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["conv2.weight"].bits == 2 and by_name["conv2.weight"].groups == 1
    assert by_name["conv1.weight"].bits == 4
    assert "fc.weight" not in by_name or by_name["fc.weight"].bits == 8
    check_runs_close(model, result.model, rng, bits=2, batch=3, layers=3)


def test_same_seed_same_model(rng):
    model = small_cnn(rng)
    a = compress(model, bits=3, seed=5).model
    b = compress(model, bits=3, seed=5).model
    assert a.SerializeToString() == b.SerializeToString()


def test_compress_then_decompress_gives_the_compressed_outputs(rng):
    model = small_cnn(rng)
    for options in ({"bits": 4}, {"bits": 2, "granularity": "tensor"}, {"bits": 6, "codebook_dtype": "float16"},
                    {"bits": 3, "granularity": "group", "group_size": 5}):
        compressed = compress(model, **options).model
        plain = decompress_model(compressed)
        onnx.checker.check_model(plain, full_check=True)
        assert not any(t.name.endswith(".indices") for t in plain.graph.initializer)
        feeds = feeds_for(model, rng, 4)
        np.testing.assert_array_equal(run(plain, feeds)[0], run(compressed, feeds)[0])


def test_external_data_save_and_reload(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(oc_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = small_cnn(rng)
    compressed = compress(model, bits=4).model
    out = tmp_path / "c.onnx"
    written = oc_io.save_model(compressed, out)
    data = tmp_path / "c.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    assert written == out.stat().st_size + data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    reloaded = oc_io.load_model(out)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = feeds_for(model, rng)
    np.testing.assert_array_equal(run(reloaded, feeds)[0], run(compressed, feeds)[0])
    # A model loaded with external data compresses again (e.g. re-compression of a big model).
    model_path = tmp_path / "orig.onnx"
    oc_io.save_model(model, model_path)
    assert (tmp_path / "orig.onnx.data").is_file()
    again = oc.compress_with_report(str(model_path), bits=4, min_elements=0).model
    np.testing.assert_array_equal(run(again, feeds)[0], run(compressed, feeds)[0])


def test_compress_model_with_explicit_config(rng):
    model = small_cnn(rng)
    config = CompressConfig(default=LayerSettings(bits=5, granularity="tensor"), min_elements=0,
                            overrides={"fc": LayerSettings(bits=3)})
    names = []
    result = compress_model(model, config, progress=names.append)
    assert names == [layer.name for layer in result.layers]
    bits = {layer.name: layer.bits for layer in result.layers}
    assert bits["fc.weight"] == 3 and bits["conv2.weight"] == 5
    cache = {}
    first = compress_model(model, config, cache=cache)
    assert cache
    second = compress_model(model, config, cache=cache)
    assert first.model.SerializeToString() == second.model.SerializeToString()


def test_declared_shape_contradiction_is_a_note_only_for_the_models_own_nodes():
    # An exporter declared a graph output with the wrong rank; once the rewrite makes
    # it inferable, the checker's full shape inference fails there.  That is a note when
    # the node is the model's own (and the structural check passes), else an error.
    from onnx_codebook.pipeline import _declared_shape_contradiction

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="Reshape_1"),
             helper.make_node("Gather", ["x", "i"], ["g"], name="Gather_2")]
    inits = [numpy_helper.from_array(np.array([6], np.int64), "s"), numpy_helper.from_array(np.array([0]), "i")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))
    error = ("[ShapeInferenceError] Inference error(s): (op_type:{op}, node name: {name}): [ShapeInferenceError] "
             "Inferred shape and existing shape differ in rank: (3) vs (2)")
    note = _declared_shape_contradiction(model, error.format(op="Reshape", name="Reshape_1"))
    assert note is not None and "Reshape_1" in note and "differ in rank" in note
    assert _declared_shape_contradiction(model, error.format(op="Gather", name="Gather_2")) is None  # ours
    assert _declared_shape_contradiction(model, error.format(op="Reshape", name="nowhere")) is None
    assert _declared_shape_contradiction(model, "[TypeInferenceError] node name: Reshape_1)") is None


def test_contradicted_output_shape_compresses_without_raw_onnxruntime_warnings(capfd, tmp_path):
    # The model declares its output as [1, -1] where it computes [1, 16, 6, 6]: compress
    # notes the contradiction once, and onnxruntime's own "Error merging shape info"
    # warning (printed straight to the process's stderr when it loads the model) stays out.
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, -1])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Reshape", ["c", "s"], ["y"], name="Reshape_1")]
    inits = [numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 16, 6, 6], np.int64), "s")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    from onnx_codebook.errors import CodebookWarning

    capfd.readouterr()
    with pytest.warns(CodebookWarning, match="contradicts the shape the source model declares after node Reshape_1"):
        result = compress_model(model, CompressConfig(min_elements=0))
    err = capfd.readouterr().err
    assert "MergeShapeInfo" not in err and "onnxruntime" not in err, err
    assert [layer.name for layer in result.layers] == ["w"]
    # evaluate (and so the search's evaluations) load such a model quietly too: here a
    # classifier declaring 3 logits where it computes 576
    nodes[1] = helper.make_node("Flatten", ["c"], ["y"], name="flatten")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits[:1]),
                                opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    np.savez(tmp_path / "d.npz", inputs=rng.random((3, 8, 6, 6)).astype(np.float32), labels=np.arange(3))
    capfd.readouterr()
    assert oc.evaluate(path, str(tmp_path / "d.npz"), reference=path)["samples"] == 3
    err = capfd.readouterr().err
    assert "MergeShapeInfo" not in err and "onnxruntime" not in err, err
