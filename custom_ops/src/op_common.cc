#include "op_common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "unpack.h"

namespace onnx_codebook {

namespace {

// Releases a status from a failed optional lookup; true when the call succeeded.
bool Succeeded(OrtStatus* status) {
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

}  // namespace

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t fallback, bool* found) {
  int64_t value = 0;
  const bool ok = Succeeded(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value));
  if (found) *found = ok;
  return ok ? value : fallback;
}

float AttrFloat(const OrtKernelInfo* info, const char* name, float fallback) {
  float value = 0.f;
  return Succeeded(Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value)) ? value : fallback;
}

std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* name, bool* found) {
  size_t size = 0;
  std::vector<int64_t> values;
  const OrtApi& api = Ort::GetApi();
  bool ok = Succeeded(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size));
  if (ok && size > 0) {
    values.resize(size);
    ok = Succeeded(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size));
    if (!ok) values.clear();
  }
  if (found) *found = ok;
  return values;
}

std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& fallback) {
  size_t size = 0;
  const OrtApi& api = Ort::GetApi();
  if (!Succeeded(api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) || size == 0) return fallback;
  std::string value(size, '\0');
  if (!Succeeded(api.KernelInfoGetAttribute_string(info, name, value.data(), &size))) return fallback;
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

Epilogue ReadEpilogue(const OrtKernelInfo* info, const std::string& op) {
  Epilogue e;
  const std::string activation = AttrString(info, "activation", "");
  auto number = [&](const char* name, float fallback) {
    const float v = AttrFloat(info, name, fallback);
    if (std::isnan(v)) Fail(op, std::string(name) + " must not be NaN");
    return v;
  };
  if (activation.empty()) return e;
  if (activation == "Relu") {
    e.kind = Activation::kClamp;
    e.lo = 0.f;
  } else if (activation == "Clip") {
    e.kind = Activation::kClamp;
    e.lo = number("activation_min", std::numeric_limits<float>::lowest());
    e.hi = number("activation_max", std::numeric_limits<float>::max());
  } else if (activation == "LeakyRelu") {
    e.kind = Activation::kLeakyRelu;
    e.alpha = number("activation_alpha", 0.01f);
  } else if (activation == "Sigmoid") {
    e.kind = Activation::kSigmoid;
  } else if (activation == "Tanh") {
    e.kind = Activation::kTanh;
  } else if (activation == "HardSigmoid") {
    e.kind = Activation::kHardSigmoid;
    e.alpha = number("activation_alpha", 0.2f);
    e.beta = number("activation_beta", 0.5f);
  } else if (activation == "HardSwish") {
    e.kind = Activation::kHardSwish;
    e.alpha = number("activation_alpha", 1.f / 6.f);
    e.beta = number("activation_beta", 0.5f);
  } else if (activation == "Silu") {
    e.kind = Activation::kSilu;
  } else {
    Fail(op, "unknown activation '" + activation +
                 "' (expected \"\", Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish or Silu)");
  }
  return e;
}

const float* OptionalBias(Ort::KernelContext& ctx, const std::string& op, int64_t channels) {
  if (ctx.GetInputCount() <= 3) return nullptr;
  auto b = ctx.GetInput(3);
  if (b == nullptr) return nullptr;
  const std::vector<int64_t> b_shape = b.GetTensorTypeAndShapeInfo().GetShape();
  if (b_shape.size() != 1 || b_shape[0] != channels) {
    Fail(op, "input B has shape " + ShapeString(b_shape) + ", expected [" + std::to_string(channels) + "]");
  }
  return b.GetTensorData<float>();
}

int64_t ShapeSize(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

namespace {

struct ConstTensor {
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  const void* data = nullptr;
};

ConstTensor ReadConstantInput(const OrtKernelInfo* info, size_t index, const std::string& op, const char* what) {
  const OrtApi& api = Ort::GetApi();
  size_t count = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &count));
  if (index >= count) Fail(op, std::string("missing input '") + what + "'");
  int is_constant = 0;
  const OrtValue* value = nullptr;
  Ort::ThrowOnError(api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value));
  if (!is_constant || value == nullptr) {
    Fail(op, std::string("input '") + what + "' must be a constant initializer");
  }
  Ort::ConstValue tensor{value};
  auto type_shape = tensor.GetTensorTypeAndShapeInfo();
  ConstTensor out;
  out.shape = type_shape.GetShape();
  out.type = type_shape.GetElementType();
  out.data = tensor.GetTensorRawData();
  return out;
}

}  // namespace

CodebookWeight LoadCodebookWeight(const OrtKernelInfo* info, const std::string& op, ChannelAxis axis,
                                  std::vector<int64_t>* weight_shape_out, int64_t conv_groups) {
  CodebookWeight w;
  bool found = false;
  const int64_t bits = AttrInt(info, "bits", 0, &found);
  if (!found) Fail(op, "missing attribute 'bits'");
  if (bits < 1 || bits > 8) Fail(op, "attribute 'bits' must be in 1..8, got " + std::to_string(bits));
  w.bits = static_cast<int>(bits);
  std::vector<int64_t> shape = AttrInts(info, "weight_shape", &found);
  if (!found || shape.empty()) Fail(op, "missing attribute 'weight_shape'");
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d <= 0) Fail(op, "weight_shape " + ShapeString(shape) + " has a non-positive dimension");
    if (d > kMaxElements / numel) Fail(op, "weight_shape " + ShapeString(shape) + " is too large");
    numel *= d;
  }
  w.group_size = AttrInt(info, "group_size", 1, &found);
  if (!found) Fail(op, "missing attribute 'group_size'");
  if (w.group_size < 1) Fail(op, "attribute 'group_size' must be >= 1, got " + std::to_string(w.group_size));

  // channels: the length of the channel axis, which the codebook rows follow
  int64_t channels = 0, kernel_size = 1;
  if (axis == ChannelAxis::kFirst) {
    w.rows = shape[0];
    w.cols = numel / shape[0];
    channels = w.rows;
  } else if (axis == ChannelAxis::kTransposedConv) {
    if (shape.size() < 3) Fail(op, "weight_shape must have rank >= 3, got " + ShapeString(shape));
    if (conv_groups < 1 || shape[0] % conv_groups != 0) {
      Fail(op, "group " + std::to_string(conv_groups) + " does not divide the " + std::to_string(shape[0]) +
                   " input channels of weight_shape " + ShapeString(shape));
    }
    channels = shape[1];
    kernel_size = numel / (shape[0] * shape[1]);
    w.rows = conv_groups * channels * kernel_size;
    w.cols = shape[0] / conv_groups;
  } else {
    if (shape.size() != 2) Fail(op, "weight_shape must be 2-D, got " + ShapeString(shape));
    w.rows = shape[1];
    w.cols = shape[0];
    channels = w.rows;
  }

  const ConstTensor idx = ReadConstantInput(info, 1, op, "indices");
  if (idx.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) Fail(op, "input 'indices' must be uint8");
  if (idx.shape.size() != 1) Fail(op, "input 'indices' must be 1-D, got shape " + ShapeString(idx.shape));
  const int64_t expected_bytes = (numel * bits + 7) / 8;
  if (idx.shape[0] != expected_bytes) {
    Fail(op, "input 'indices' has " + std::to_string(idx.shape[0]) + " bytes, expected " +
                 std::to_string(expected_bytes) + " for weight_shape " + ShapeString(shape) + " at " +
                 std::to_string(bits) + " bits");
  }

  const ConstTensor cb = ReadConstantInput(info, 2, op, "codebook");
  if (cb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(op, "input 'codebook' must be float32");
  const int64_t groups = (channels + w.group_size - 1) / w.group_size;
  if (cb.shape.size() != 2 || cb.shape[0] != groups || cb.shape[1] < 1 || cb.shape[1] > (int64_t{1} << bits)) {
    Fail(op, "input 'codebook' has shape " + ShapeString(cb.shape) + ", expected [" + std::to_string(groups) +
                 ", k] with 1 <= k <= " + std::to_string(int64_t{1} << bits) + " (" + std::to_string(channels) +
                 " channels, group_size " + std::to_string(w.group_size) + ")");
  }
  w.k = cb.shape[1];
  w.lut_stride = std::max<int64_t>(int64_t{1} << bits, 8);
  const float* cb_data = static_cast<const float*>(cb.data);
  w.finite = std::all_of(cb_data, cb_data + cb.shape[0] * cb.shape[1], [](float v) { return std::isfinite(v); });
  if (axis == ChannelAxis::kTransposedConv) {
    // one lut row per output channel (g, m), so that row r reads lut row r / K
    w.lut.assign(static_cast<size_t>(conv_groups * channels * w.lut_stride), 0.f);
    for (int64_t gm = 0; gm < conv_groups * channels; ++gm) {
      const float* row = cb_data + (gm % channels) / w.group_size * w.k;
      std::copy(row, row + w.k, w.lut.begin() + gm * w.lut_stride);
    }
    w.group_size = kernel_size;
  } else {
    w.lut.assign(static_cast<size_t>(groups * w.lut_stride), 0.f);
    for (int64_t g = 0; g < groups; ++g) {
      std::copy(cb_data + g * w.k, cb_data + (g + 1) * w.k, w.lut.begin() + g * w.lut_stride);
    }
  }

  w.cols_padded = (w.cols + 7) / 8 * 8;
  w.row_bytes = w.cols_padded / 8 * bits;
  const uint8_t* src = static_cast<const uint8_t*>(idx.data);
  const uint32_t k = static_cast<uint32_t>(w.k);
  auto bad_index = [&](uint32_t value, int64_t flat) {
    Fail(op, "index " + std::to_string(value) + " at position " + std::to_string(flat) +
                 " is out of range for a codebook of k=" + std::to_string(k) + " entries");
  };
  if (axis == ChannelAxis::kFirst && w.cols % 8 == 0) {
    // The packed stream already is one byte-aligned row per output channel: use
    // onnxruntime's initializer in place (it lives as long as the session, hence the
    // kernel) and copy only the last rows, which the 8-byte loads may read past.
    for (int64_t i = 0; i < numel; ++i) {
      const uint32_t v = ReadIndex(src, static_cast<size_t>(i), w.bits);
      if (v >= k) bad_index(v, i);
    }
    const int64_t tail = std::min(w.rows, (8 + w.row_bytes - 1) / w.row_bytes);
    w.shared = src;
    w.shared_rows = w.rows - tail;
    w.indices.assign(static_cast<size_t>(tail * w.row_bytes + 8), 0);
    std::copy(src + w.shared_rows * w.row_bytes, src + w.rows * w.row_bytes, w.indices.begin());
    if (weight_shape_out) *weight_shape_out = shape;
    return w;
  }
  // Otherwise re-lay out the packed indices as one padded row per output channel,
  // checking every index against k on the way.
  w.indices.assign(static_cast<size_t>(w.rows * w.row_bytes + 8), 0);
  if (axis == ChannelAxis::kFirst) {
    for (int64_t r = 0; r < w.rows; ++r) {
      uint8_t* dst = w.indices.data() + r * w.row_bytes;
      const int64_t base = r * w.cols;
      if (w.cols % 8 == 0 && (base * bits) % 8 == 0) {
        std::copy(src + base * bits / 8, src + (base + w.cols) * bits / 8, dst);  // already aligned
        for (int64_t c = 0; c < w.cols; ++c) {
          const uint32_t v = ReadIndex(dst, static_cast<size_t>(c), w.bits);
          if (v >= k) bad_index(v, base + c);
        }
      } else {
        for (int64_t c = 0; c < w.cols; ++c) {
          const uint32_t v = ReadIndex(src, static_cast<size_t>(base + c), w.bits);
          if (v >= k) bad_index(v, base + c);
          WriteIndex(dst, static_cast<size_t>(c), w.bits, v);
        }
      }
    }
  } else if (axis == ChannelAxis::kTransposedConv) {
    // [C, M/group, K] -> rows (g, m, t), columns c of group g
    const int64_t cin_g = w.cols;
    for (int64_t flat = 0; flat < numel; ++flat) {
      const int64_t c = flat / (channels * kernel_size), mt = flat % (channels * kernel_size);
      const int64_t row = ((c / cin_g) * channels + mt / kernel_size) * kernel_size + mt % kernel_size;
      const uint32_t v = ReadIndex(src, static_cast<size_t>(flat), w.bits);
      if (v >= k) bad_index(v, flat);
      WriteIndex(w.indices.data() + row * w.row_bytes, static_cast<size_t>(c % cin_g), w.bits, v);
    }
  } else {
    // weight [K, N] with channels last: transpose.
    for (int64_t c = 0; c < w.cols; ++c) {
      for (int64_t r = 0; r < w.rows; ++r) {
        const int64_t flat = c * w.rows + r;
        const uint32_t v = ReadIndex(src, static_cast<size_t>(flat), w.bits);
        if (v >= k) bad_index(v, flat);
        WriteIndex(w.indices.data() + r * w.row_bytes, static_cast<size_t>(c), w.bits, v);
      }
    }
  }
  if (weight_shape_out) *weight_shape_out = shape;
  return w;
}

}  // namespace onnx_codebook
