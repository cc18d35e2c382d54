"""onnx-codebook: codebook (weight-sharing) compression of ONNX CNNs.

Public API::

    import onnx_codebook as oc
    small = oc.compress("model.onnx", bits=4, granularity="channel")   # -> onnx.ModelProto
    oc.evaluate(small, "data.npz", reference="model.onnx")             # -> dict of metrics
    oc.inspect(small)                                                  # -> per-layer storage
    sess = oc.session(small)                                           # onnxruntime session
"""

from __future__ import annotations

from typing import Mapping

import onnx

from .pipeline import CompressResult, compress_model
from .config import CompressConfig, LayerSettings
from .errors import (
    CodebookError,
    ConfigError,
    DataError,
    ModelLoadError,
    NoEligibleLayerError,
    OutputError,
    RuntimeLibraryError,
)
from .evaluation import evaluate
from .io import load_model, save_model
from .schema import SUPPORTED_OPS

__version__ = "0.1.0"


def make_config(
    *,
    bits: int = 4,
    granularity: str = "channel",
    group_size: int = 8,
    method: str = "kmeans",
    init: str = "auto",
    ops=SUPPORTED_OPS,
    min_elements: int = 4096,
    format: str = "standard",
    codebook_dtype: str = "float32",
    layers: Mapping[str, LayerSettings | Mapping] | None = None,
    seed: int = 0,
) -> CompressConfig:
    """Build and validate a :class:`CompressConfig` from keyword options.

    ``layers`` overrides settings per weight name, node name or op type, e.g.
    ``{"Gemm": {"bits": 8}, "conv1.weight": LayerSettings(bits=6)}``.
    """
    if isinstance(ops, str):
        ops = tuple(o.strip() for o in ops.split(",") if o.strip())
    default = LayerSettings(bits=bits, granularity=granularity, group_size=group_size, method=method, init=init)
    overrides = {}
    for key, value in (layers or {}).items():
        if isinstance(value, Mapping):
            unknown = set(value) - {"bits", "granularity", "group_size", "method", "init"}
            if unknown:
                raise ConfigError(f"layer {key!r}: unknown setting(s) {', '.join(sorted(unknown))}")
            value = LayerSettings(**{**default.__dict__, **value})
        overrides[key] = value
    return CompressConfig(default=default, ops=tuple(ops), min_elements=min_elements, format=format,
                          codebook_dtype=codebook_dtype, overrides=overrides, seed=seed)


def compress(model: onnx.ModelProto | str, *, validate: bool = True, **options) -> onnx.ModelProto:
    """Compress ``model`` (a path or ModelProto); returns the compressed ModelProto.

    Options are those of :func:`make_config` (bits, granularity, group_size,
    method, init, ops, min_elements, format, codebook_dtype, layers, seed).
    Use :func:`compress_with_report` for the per-layer results.
    """
    return compress_with_report(model, validate=validate, **options).model


def compress_with_report(model: onnx.ModelProto | str, *, validate: bool = True, progress=None, **options) -> CompressResult:
    """Like :func:`compress`, but returns a :class:`CompressResult` (model, layers, skipped, warnings)."""
    config = make_config(**options)
    return compress_model(load_model(model), config, validate=validate, progress=progress)


def inspect(model: onnx.ModelProto | str) -> dict:
    """Per-layer storage (bits, codebook entries, bytes) and totals of a model."""
    from .analysis import inspect_model

    return inspect_model(load_model(model))


def decompress(model: onnx.ModelProto | str) -> onnx.ModelProto:
    """A model with plain float weights whose outputs equal the compressed model's."""
    from .analysis import decompress_model

    return decompress_model(load_model(model))


def session(model, **kwargs):
    """An onnxruntime InferenceSession; registers the custom-op library when the model needs it."""
    from . import ops

    return ops.session(load_model(model) if not isinstance(model, onnx.ModelProto) else model, **kwargs)


__all__ = [
    "compress", "compress_with_report", "decompress", "evaluate", "inspect", "session", "make_config",
    "load_model", "save_model", "CompressConfig", "LayerSettings", "CompressResult",
    "CodebookError", "ConfigError", "DataError", "ModelLoadError", "NoEligibleLayerError", "OutputError",
    "RuntimeLibraryError",
]
