// Kernel and op declarations for the onnx_codebook domain.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "op_common.h"

namespace onnx_codebook {

inline constexpr const char* kConvName = "CodebookConv";
inline constexpr const char* kGemmName = "CodebookGemm";
inline constexpr const char* kMatMulName = "CodebookMatMul";
inline constexpr const char* kConvTransposeName = "CodebookConvTranspose";

// Output size and leading pad of one spatial axis of a convolution; fails when the
// padded input is smaller than the dilated kernel.
void ResolveAxis(const std::string& op, const std::string& auto_pad, int64_t in, int64_t kernel, int64_t stride,
                 int64_t dilation, int64_t pad_begin, int64_t pad_end, int64_t* out, int64_t* lead);

// The spatial attributes shared by CodebookConv and CodebookConvTranspose, read and
// checked against the kernel dims of weight_shape (from axis 2): kernel_shape (if
// given) must match them; strides and dilations default to 1, pads to 0.
struct ConvAttributes {
  std::vector<int64_t> kernel, strides, dilations, pads;
};
ConvAttributes ReadConvAttributes(const OrtKernelInfo* info, const std::string& op,
                                  const std::vector<int64_t>& weight_shape);

// Output size of one spatial axis of a transposed convolution with explicit pads
// (may be <= 0 for inconsistent attributes: the caller decides).
inline int64_t TransposedAxis(int64_t in, int64_t kernel, int64_t stride, int64_t dilation, int64_t pad_begin,
                              int64_t pad_end, int64_t output_padding) {
  return stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - pad_begin - pad_end;
}

// Output shape inference for onnxruntime (shape_infer.cc).
OrtStatusPtr ORT_API_CALL InferConvShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) noexcept;
OrtStatusPtr ORT_API_CALL InferGemmShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) noexcept;
OrtStatusPtr ORT_API_CALL InferMatMulShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) noexcept;
OrtStatusPtr ORT_API_CALL InferConvTransposeShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) noexcept;

// y[M, N] = act(y + alpha * op(A) * W^T) for the codebook weight W (N rows of K entries);
// with y_holds_values false, y's contents are ignored (act(alpha * op(A) * W^T)).
void WeightMatMul(const CodebookWeight& w, const float* a, int64_t M, bool trans_a, float alpha, const Epilogue& act,
                  float* y, const OrtKernelContext* ctx, bool y_holds_values = true);

class GemmKernel {
 public:
  GemmKernel(const OrtKernelInfo* info, bool matmul);
  OrtStatus* ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void ComputeGemm(OrtKernelContext* context);
  void ComputeMatMul(OrtKernelContext* context);

  std::string op_;
  bool matmul_ = false;
  float alpha_ = 1.f, beta_ = 1.f;
  bool trans_a_ = false, trans_b_ = false;
  Epilogue act_;
  CodebookWeight weight_;
};

class ConvPlans;  // the plans of the geometries a kernel has run (codebook_conv.cc)

class ConvKernel {
 public:
  explicit ConvKernel(const OrtKernelInfo* info);
  ~ConvKernel();
  OrtStatus* ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);

  std::string op_ = kConvName;
  std::string auto_pad_;
  std::vector<int64_t> weight_shape_;
  ConvAttributes attrs_;
  int64_t group_ = 1;
  Epilogue act_;
  CodebookWeight weight_;
  // Threads of the session's pool, as seen running this kernel's parallel loops
  std::atomic<int64_t> pool_threads_{1};
  std::unique_ptr<ConvPlans> plans_;
};

// ONNX ConvTranspose (1-D and 2-D, explicit pads: no auto_pad or output_shape) as
// the GEMM of its weight's rows (ChannelAxis::kTransposedConv) with the input
// pixels, scattered into the output (codebook_conv_transpose.cc).
class ConvTransposeKernel {
 public:
  explicit ConvTransposeKernel(const OrtKernelInfo* info);
  OrtStatus* ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);

  std::string op_ = kConvTransposeName;
  std::vector<int64_t> weight_shape_, output_padding_;
  ConvAttributes attrs_;
  int64_t group_ = 1;
  Epilogue act_;
  CodebookWeight weight_;
};

// Op descriptors; inputs: X/A, indices, codebook[, bias/C][, Z (CodebookConv)].
template <typename Derived, typename Kernel>
struct CodebookOpBase : Ort::CustomOpBase<Derived, Kernel, /*WithStatus=*/true> {
  size_t GetInputTypeCount() const { return static_cast<const Derived*>(this)->kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct CodebookConvOp : CodebookOpBase<CodebookConvOp, ConvKernel> {
  static constexpr size_t kInputs = 5;
  CodebookConvOp() { InferOutputShapeFn = &InferConvShape; }
  const char* GetName() const { return kConvName; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    return GuardStatus(kConvName, [&] { *kernel = new ConvKernel(info); });
  }
};

struct CodebookGemmOp : CodebookOpBase<CodebookGemmOp, GemmKernel> {
  static constexpr size_t kInputs = 4;
  CodebookGemmOp() { InferOutputShapeFn = &InferGemmShape; }
  const char* GetName() const { return kGemmName; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    return GuardStatus(kGemmName, [&] { *kernel = new GemmKernel(info, false); });
  }
};

struct CodebookMatMulOp : CodebookOpBase<CodebookMatMulOp, GemmKernel> {
  static constexpr size_t kInputs = 3;
  CodebookMatMulOp() { InferOutputShapeFn = &InferMatMulShape; }
  const char* GetName() const { return kMatMulName; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    return GuardStatus(kMatMulName, [&] { *kernel = new GemmKernel(info, true); });
  }
};

struct CodebookConvTransposeOp : CodebookOpBase<CodebookConvTransposeOp, ConvTransposeKernel> {
  static constexpr size_t kInputs = 4;
  CodebookConvTransposeOp() { InferOutputShapeFn = &InferConvTransposeShape; }
  const char* GetName() const { return kConvTransposeName; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    return GuardStatus(kConvTransposeName, [&] { *kernel = new ConvTransposeKernel(info); });
  }
};

}  // namespace onnx_codebook
