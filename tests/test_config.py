"""Compression settings: validated when built, resolved by name > op type > default."""

from __future__ import annotations

import dataclasses

import pytest

import onnx_codebook as oc
from onnx_codebook.config import CompressConfig, LayerSettings
from onnx_codebook.errors import ConfigError


def test_defaults():
    s = LayerSettings()
    assert (s.bits, s.granularity, s.group_size, s.method, s.init) == (4, "channel", 8, "kmeans", "auto")
    c = CompressConfig()
    assert c.ops == ("Conv", "ConvTranspose", "Gemm", "MatMul")
    assert (c.min_elements, c.format, c.codebook_dtype) == (4096, "standard", "float32")


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": True}, "bits"), ({"bits": 4.0}, "bits"),
    ({"granularity": "layer"}, "granularity"), ({"group_size": 0}, "group size"),
    ({"method": "ternary"}, "method"), ({"method": "binary", "bits": 2}, "binary"), ({"init": "random"}, "init"),
])
def test_layer_settings_reject_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LayerSettings(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"ops": ("Conv", "LSTM")}, "LSTM"), ({"ops": ()}, "none given"), ({"min_elements": -1}, "min-elements"),
    ({"format": "packed"}, "format"), ({"codebook_dtype": "bfloat16"}, "dtype"), ({"overrides": {"x": {"bits": 2}}}, "x"),
])
def test_compress_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressConfig(**kwargs)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LayerSettings().bits = 2
    config = CompressConfig(overrides={"a": LayerSettings(bits=2)})
    with pytest.raises(TypeError):
        config.overrides["b"] = LayerSettings()


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bit_width_is_valid(bits):
    assert LayerSettings(bits=bits).bits == bits


def test_group_size_for():
    assert LayerSettings(granularity="tensor").group_size_for(32) == 32
    assert LayerSettings(granularity="channel").group_size_for(32) == 1
    assert LayerSettings(granularity="group", group_size=8).group_size_for(32) == 8
    assert LayerSettings(granularity="group", group_size=8).group_size_for(5) == 5


def test_resolution_order_name_then_op_type_then_default():
    weight, node, op = LayerSettings(bits=2), LayerSettings(bits=3), LayerSettings(bits=5)
    config = CompressConfig(default=LayerSettings(bits=6), overrides={"w": weight, "conv": node, "Conv": op})
    assert config.settings_for("w", ("conv",), "Conv") is weight
    assert config.settings_for("other", ("conv",), "Conv") is node
    assert config.settings_for("other", ("conv2",), "Conv") is op
    assert config.settings_for("other", ("fc",), "Gemm").bits == 6
    merged = config.with_overrides({"Gemm": LayerSettings(bits=1)})
    assert merged.settings_for("x", (), "Gemm").bits == 1 and merged.settings_for("w", (), "Conv") is weight


def test_make_config():
    config = oc.make_config(bits=3, ops="Conv, Gemm", layers={"Gemm": {"bits": 8}, "w": LayerSettings(bits=1)})
    assert config.ops == ("Conv", "Gemm")
    assert config.settings_for("x", (), "Gemm") == LayerSettings(bits=8)
    assert config.settings_for("w", (), "Conv").bits == 1
    with pytest.raises(ConfigError, match="unknown setting"):
        oc.make_config(layers={"Gemm": {"nbits": 8}})
    with pytest.raises(ConfigError, match="bits"):
        oc.make_config(bits=9)
