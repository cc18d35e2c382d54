"""Packing of sub-byte indices.

Bit order (mirrored by ``custom_ops/src/unpack.h``): index ``i`` occupies bits
``[i*nbits, (i+1)*nbits)`` of a little-endian bit stream, where stream bit ``b``
is bit ``b % 8`` (LSB first) of byte ``b // 8``.  The last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np

from .errors import CodebookError


def _check_nbits(nbits: int) -> None:
    if not isinstance(nbits, (int, np.integer)) or not 1 <= nbits <= 8:
        raise CodebookError(f"nbits must be an integer in 1..8, got {nbits!r}")


def packed_size(count: int, nbits: int) -> int:
    """Bytes needed for ``count`` indices of ``nbits`` bits."""
    _check_nbits(nbits)
    return (int(count) * int(nbits) + 7) // 8


def pack_bits(indices: np.ndarray, nbits: int) -> np.ndarray:
    """Pack unsigned indices (any shape, row-major) into a 1-D uint8 array."""
    _check_nbits(nbits)
    flat = np.ascontiguousarray(indices).reshape(-1)
    if flat.size and (flat.min() < 0 or int(flat.max()) >= (1 << nbits)):
        raise CodebookError(f"indices out of range for {nbits}-bit packing")
    flat = flat.astype(np.uint8, copy=False)
    if nbits == 8:
        return flat.copy()
    bits = np.unpackbits(flat[:, None], axis=1, count=nbits, bitorder="little")
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` indices as uint8."""
    _check_nbits(nbits)
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_size(count, nbits):
        raise CodebookError(
            f"packed buffer has {packed.size} bytes, {packed_size(count, nbits)} needed "
            f"for {count} indices of {nbits} bits"
        )
    if nbits == 8:
        return packed[:count].copy()
    bits = np.unpackbits(packed, bitorder="little")[: count * nbits]
    return np.packbits(bits.reshape(count, nbits), axis=1, bitorder="little").reshape(-1)


def container_bits(nbits: int) -> int:
    """Width of the ONNX integer type that stores ``nbits``-bit indices (2, 4 or 8)."""
    _check_nbits(nbits)
    return 2 if nbits <= 2 else 4 if nbits <= 4 else 8
