"""Sub-byte index packing: round trips, the documented bit order, range checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_codebook.errors import CodebookError
from onnx_codebook.pack import container_bits, pack_bits, packed_size, unpack_bits


@st.composite
def indices_and_bits(draw):
    nbits = draw(st.integers(1, 8))
    values = draw(st.lists(st.integers(0, (1 << nbits) - 1), max_size=300))
    return np.asarray(values, dtype=np.uint8), nbits


@settings(max_examples=300, deadline=None)
@given(indices_and_bits())
def test_round_trip(case):
    indices, nbits = case
    packed = pack_bits(indices, nbits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == packed_size(indices.size, nbits) == (indices.size * nbits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, nbits, indices.size), indices)
    # Unused high bits of the last byte are zero.
    used = indices.size * nbits
    if used % 8:
        assert int(packed[-1]) >> (used % 8) == 0


@settings(max_examples=100, deadline=None)
@given(indices_and_bits(), st.integers(1, 4))
def test_any_shape_packs_row_major(case, rows):
    indices, nbits = case
    grid = np.resize(indices, (rows, indices.size)) if indices.size else np.zeros((rows, 0), np.uint8)
    np.testing.assert_array_equal(pack_bits(grid, nbits), pack_bits(grid.reshape(-1), nbits))


@settings(max_examples=100, deadline=None)
@given(indices_and_bits())
def test_bit_order_matches_the_stream_definition(case):
    """Index i occupies stream bits [i*nbits, (i+1)*nbits); stream bit b is bit b % 8 of byte b // 8."""
    indices, nbits = case
    packed = pack_bits(indices, nbits)
    for i, value in enumerate(indices[:40].tolist()):
        got = 0
        for j in range(nbits):
            b = i * nbits + j
            got |= ((int(packed[b // 8]) >> (b % 8)) & 1) << j
        assert got == value


def test_hand_computed_examples():
    # 2 bits: [1, 2, 3, 0] -> 0b00_11_10_01 = 0x39; then [2] -> 0b10.
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 0, 2]), 2), [0x39, 0x02])
    # 4 bits: low nibble first.
    np.testing.assert_array_equal(pack_bits(np.array([0x1, 0xF, 0x7]), 4), [0xF1, 0x07])
    # 3 bits: 5 (101), 3 (011), 6 (110) -> stream 101 110 011 (LSB first) = bits 0..8:
    # byte0 = 1,0,1, 1,1,0, 0,1 -> 0b10011101 = 0x9D; byte1 = bit 8 = 1 -> 0x01.
    np.testing.assert_array_equal(pack_bits(np.array([5, 3, 6]), 3), [0x9D, 0x01])
    # 1 bit: LSB first.
    np.testing.assert_array_equal(pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1), [0x81, 0x01])
    # 8 bits: the bytes themselves.
    np.testing.assert_array_equal(pack_bits(np.array([0, 255, 7]), 8), [0, 255, 7])
    np.testing.assert_array_equal(unpack_bits(np.array([0x9D, 0x01], np.uint8), 3, 3), [5, 3, 6])


def test_empty():
    for nbits in range(1, 9):
        assert pack_bits(np.zeros(0, np.uint8), nbits).size == 0
        assert unpack_bits(np.zeros(0, np.uint8), nbits, 0).size == 0


@pytest.mark.parametrize("nbits", range(1, 9))
def test_out_of_range_indices_are_rejected(nbits):
    with pytest.raises(CodebookError, match="out of range"):
        pack_bits(np.array([0, 1 << nbits]), nbits)
    with pytest.raises(CodebookError, match="out of range"):
        pack_bits(np.array([-1, 0]), nbits)


@pytest.mark.parametrize("nbits", [0, 9, -1, 2.0, "4", None, True + 8])
def test_bad_nbits_is_rejected(nbits):
    for call in (lambda: pack_bits(np.zeros(3, np.uint8), nbits), lambda: unpack_bits(np.zeros(3, np.uint8), nbits, 1),
                 lambda: packed_size(3, nbits), lambda: container_bits(nbits)):
        with pytest.raises(CodebookError, match="nbits"):
            call()


def test_short_buffer_is_rejected():
    with pytest.raises(CodebookError, match="needed"):
        unpack_bits(np.zeros(1, np.uint8), 4, 3)


def test_container_bits():
    assert [container_bits(n) for n in range(1, 9)] == [2, 2, 4, 4, 8, 8, 8, 8]
