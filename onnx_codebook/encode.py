"""Weight -> encoded tensors, and the byte accounting of every format.

Codebook bytes (and the standard format's channel offsets) count in every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from ml_dtypes import uint2, uint4

from .cluster import Clustering, cluster_weight
from .config import LayerSettings
from .pack import container_bits, pack_bits, packed_size

ONNX_INDEX_TYPE = {2: onnx.TensorProto.UINT2, 4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8}
NUMPY_INDEX_TYPE = {2: uint2, 4: uint4, 8: np.uint8}
CODEBOOK_ITEMSIZE = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class Footprint:
    """Stored bytes of one encoded weight."""

    index_bytes: int
    codebook_bytes: int
    offset_bytes: int

    @property
    def total(self) -> int:
        return self.index_bytes + self.codebook_bytes + self.offset_bytes


def footprint(
    size: int,
    channels: int,
    bits: int,
    group_size: int,
    k: int,
    *,
    fmt: str = "standard",
    codebook_itemsize: int = 4,
    container: int | None = None,
) -> Footprint:
    """Bytes of ``size`` indices + a ``[ceil(channels/group_size), k]`` codebook.

    The standard format stores indices in 2/4/8-bit containers (``container``
    overrides, e.g. 8 when the opset cannot be raised) and needs an INT32 offset
    per channel when there is more than one codebook row; the fused format packs
    exactly ``bits`` bits and needs no offsets.
    """
    groups = -(-channels // max(group_size, 1))
    if fmt == "fused":
        return Footprint(packed_size(size, bits), groups * k * 4, 0)
    width = container or container_bits(bits)
    return Footprint((size * width + 7) // 8, groups * k * codebook_itemsize, 4 * channels if groups > 1 else 0)


def effective_group_size(
    size: int, channels: int, settings: LayerSettings, *, fmt: str, codebook_itemsize: int = 4,
    weight_itemsize: int = 4,
) -> tuple[int, str]:
    """Group size to use, coarsened until the codebook costs less than indexing saves
    (against the weight's own ``weight_itemsize`` bytes per value).

    Returns ``(group_size, note)``; ``group_size == 0`` means the layer does not
    pay for itself even with one codebook and should be left alone.
    """
    k = 1 << settings.bits
    original = size * weight_itemsize
    gs = settings.group_size_for(channels)
    asked = gs
    while True:
        fp = footprint(size, channels, settings.bits, gs, k, fmt=fmt, codebook_itemsize=codebook_itemsize)
        saved = original - fp.index_bytes
        if fp.codebook_bytes + fp.offset_bytes <= saved:
            break
        if gs >= channels:
            return 0, "codebook would cost more than it saves"
        gs = min(gs * 2, channels)
    note = "" if gs == asked else f"groups of {gs} channels (a finer codebook would cost more than it saves)"
    return gs, note


def cluster_layer(
    weight: np.ndarray,
    settings: LayerSettings,
    axis: int,
    group_size: int,
    *,
    seed: int = 0,
    importance: np.ndarray | None = None,
) -> Clustering:
    return cluster_weight(
        weight,
        settings.bits,
        axis=axis,
        group_size=group_size,
        method=settings.method,
        init=settings.init,
        importance=importance,
        seed=seed,
    )


def indices_tensor(name: str, indices: np.ndarray, container: int) -> onnx.TensorProto:
    """Standard format: indices with the weight's shape as UINT2/UINT4/UINT8 (packed raw_data)."""
    arr = indices.astype(NUMPY_INDEX_TYPE[container])
    return onnx.numpy_helper.from_array(arr, name)


def packed_indices_tensor(name: str, indices: np.ndarray, bits: int) -> onnx.TensorProto:
    """Fused format: 1-D UINT8 tensor, ``bits`` bits per index (see schema)."""
    return onnx.numpy_helper.from_array(pack_bits(indices, bits), name)


def offsets_array(channels: int, group_size: int, k: int, axis: int, rank: int) -> np.ndarray:
    """INT32 offset ``(c // group_size) * k`` along ``axis``, broadcastable to the weight."""
    offsets = (np.arange(channels, dtype=np.int64) // group_size * k).astype(np.int32)
    shape = [1] * rank
    shape[axis] = channels
    return offsets.reshape(shape)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio in dB (inf when exact)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    sig = float(np.sum(ref * ref))
    if err == 0:
        return float("inf")
    if sig == 0:
        return float("-inf")
    return 10.0 * np.log10(sig / err)
