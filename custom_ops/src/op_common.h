// Helpers shared by the CodebookConv / CodebookGemm / CodebookMatMul kernels:
// attribute access, errors, and the compressed weight read at kernel creation.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT  // symbols come through the OrtApi struct, nothing is linked
#endif
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace onnx_codebook {

inline constexpr const char* kDomain = "onnx_codebook";

// Every error raised by the kernels; turned into an OrtStatus at the ABI boundary.
[[noreturn]] inline void Fail(const std::string& op, const std::string& what) {
  throw Ort::Exception(op + ": " + what, ORT_INVALID_ARGUMENT);
}

// Runs `body` and converts any exception into an OrtStatus (nullptr on success).
template <typename Body>
OrtStatus* GuardStatus(const char* op, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": " + e.what()).c_str());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": unknown error").c_str());
  }
}

// Attribute readers with defaults for optional attributes.
int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t fallback, bool* found = nullptr);
float AttrFloat(const OrtKernelInfo* info, const char* name, float fallback);
std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* name, bool* found = nullptr);
std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& fallback);

// A compressed weight viewed as `rows` output channels of `cols` reduction entries:
// value(r, c) = lut[(r / group_size) * lut_stride + index(r, c)].
// Indices are stored row by row at exactly `bits` bits, each row padded to a
// multiple of 8 indices (row_bytes = cols_padded / 8 * bits), plus 8 spare bytes.
// When the packed initializer already has that layout, rows [0, shared_rows) are
// read from it in place and only the remaining rows are copied into `indices`.
struct CodebookWeight {
  int bits = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t cols_padded = 0;
  int64_t row_bytes = 0;
  int64_t group_size = 1;
  int64_t k = 0;
  int64_t lut_stride = 0;  // >= max(k, 8); entries past k are 0
  std::vector<uint8_t> indices;
  const uint8_t* shared = nullptr;
  int64_t shared_rows = 0;
  std::vector<float> lut;
  // every codebook entry is finite, so that a zero input contributes nothing to any
  // sum (kernels that skip zero inputs need this: 0 * inf is NaN)
  bool finite = true;

  const uint8_t* Row(int64_t r) const {
    return r < shared_rows ? shared + r * row_bytes : indices.data() + (r - shared_rows) * row_bytes;
  }
  const float* Lut(int64_t r) const { return lut.data() + (r / group_size) * lut_stride; }
};

// How the weight_shape maps to (rows, cols): the channel axis is either the first
// axis (Conv, Gemm with transB) or the last of a 2-D shape (Gemm, MatMul).
// kTransposedConv: a ConvTranspose weight [C, M/group, k...] (channel axis 1) as the
// matrix of its GEMM: row (g * M/group + m) * K + t holds, at column c < C/group,
// W[g * C/group + c, m, t] for the flattened kernel position t of K; every row reads
// the codebook row of its output channel (group_size of the result is then K, one
// lut row per output channel).
enum class ChannelAxis { kFirst, kLast, kTransposedConv };

// Reads and validates inputs 1 (indices) and 2 (codebook) as constants; reads the
// bits / weight_shape / group_size attributes.  Fails with a message naming `op`.
// `conv_groups`: the group attribute, for kTransposedConv.
CodebookWeight LoadCodebookWeight(const OrtKernelInfo* info, const std::string& op,
                                  ChannelAxis axis, std::vector<int64_t>* weight_shape, int64_t conv_groups = 1);

// The fused epilogue's activation, applied where an output element is finally written.
enum class Activation {
  kNone,
  kClamp,        // min(max(y, lo), hi) (Relu: lo = 0, hi = +inf; Clip: its bounds)
  kLeakyRelu,    // y < 0 ? alpha y : y
  kSigmoid,      // 1 / (1 + exp(-y))
  kTanh,         // tanh(y)
  kHardSigmoid,  // max(0, min(1, alpha y + beta))
  kHardSwish,    // y HardSigmoid(y) (ONNX HardSwish: alpha = 1/6, beta = 1/2)
  kSilu,         // y Sigmoid(y) (SiLU / Swish: Mul(y, Sigmoid(y)) in ONNX)
};

struct Epilogue {
  Activation kind = Activation::kNone;
  float lo = -std::numeric_limits<float>::infinity();
  float hi = std::numeric_limits<float>::infinity();
  float alpha = 0.f, beta = 0.f;
  bool Active() const { return kind != Activation::kNone; }
  float Apply(float v) const {
    // (the common cases first, as plain selects a loop can vectorise)
    if (kind == Activation::kNone) return v;
    if (kind == Activation::kClamp) return std::min(std::max(v, lo), hi);
    return ApplyOther(v);
  }
  float ApplyOther(float v) const {
    switch (kind) {
      case Activation::kNone: return v;
      case Activation::kClamp: return std::min(std::max(v, lo), hi);
      case Activation::kLeakyRelu: return v < 0.f ? alpha * v : v;
      case Activation::kSigmoid: return 1.f / (1.f + std::exp(-v));
      case Activation::kTanh: return std::tanh(v);
      case Activation::kHardSigmoid: return std::max(0.f, std::min(1.f, alpha * v + beta));
      case Activation::kHardSwish: return v * std::max(0.f, std::min(1.f, alpha * v + beta));
      case Activation::kSilu: return v / (1.f + std::exp(-v));
    }
    return v;
  }
};

// Reads `activation` ("", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
// "HardSwish", "Silu") and its attributes (activation_min / activation_max for Clip,
// activation_alpha for LeakyRelu, HardSigmoid and HardSwish, activation_beta for the
// last two); fails for an unknown activation or NaN attributes.
Epilogue ReadEpilogue(const OrtKernelInfo* info, const std::string& op);

// Input 3 of a convolution, the optional bias: its data, or null when absent; fails
// unless it has shape [channels].
const float* OptionalBias(Ort::KernelContext& ctx, const std::string& op, int64_t channels);

int64_t ShapeSize(const std::vector<int64_t>& shape);
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace onnx_codebook
