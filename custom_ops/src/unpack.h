// Sub-byte index packing, mirrored from onnx_codebook/pack.py.
//
// Index i of a stream packed at `bits` bits occupies stream bits [i*bits, (i+1)*bits);
// stream bit b is bit (b % 8), LSB first, of byte (b / 8).
//
// The kernels keep indices in this same bit order, re-laid out as rows of one output
// channel each, every row padded to a multiple of 8 indices.  Eight indices then fill
// exactly `bits` bytes, so a block of 8 starts on a byte boundary and can be expanded
// with one 64-bit load (see decode.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace onnx_codebook {

// Reads index `i` of a stream of `bits`-bit indices.  The caller guarantees that
// bytes [i*bits/8, (i*bits + bits - 1)/8] are readable.
inline uint32_t ReadIndex(const uint8_t* stream, size_t i, int bits) {
  const size_t bit = i * static_cast<size_t>(bits);
  const size_t byte = bit >> 3;
  const unsigned shift = static_cast<unsigned>(bit & 7);
  uint32_t word = stream[byte];
  if (shift + static_cast<unsigned>(bits) > 8) word |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

// Writes index `i` into a zero-initialised stream (ORs the bits in).
inline void WriteIndex(uint8_t* stream, size_t i, int bits, uint32_t value) {
  const size_t bit = i * static_cast<size_t>(bits);
  const size_t byte = bit >> 3;
  const unsigned shift = static_cast<unsigned>(bit & 7);
  const uint32_t word = value << shift;
  stream[byte] |= static_cast<uint8_t>(word & 0xFFu);
  if (shift + static_cast<unsigned>(bits) > 8) stream[byte + 1] |= static_cast<uint8_t>(word >> 8);
}

// Mask with the low `bits` bits of every byte set: _pdep_u64 with it spreads eight
// consecutive `bits`-bit indices into eight bytes.
inline uint64_t ByteLaneMask(int bits) {
  const uint64_t lane = (1ull << bits) - 1ull;
  return lane * 0x0101010101010101ull;
}

// Portable expansion of 8 indices starting at a byte boundary (the `bits` bytes at p).
inline void ExpandEight(const uint8_t* p, int bits, uint8_t out[8]) {
  uint64_t v = 0;
  std::memcpy(&v, p, static_cast<size_t>(bits));
  const uint64_t mask = (1ull << bits) - 1ull;
  for (int j = 0; j < 8; ++j) out[j] = static_cast<uint8_t>((v >> (j * bits)) & mask);
}

}  // namespace onnx_codebook
