// CodebookGemm and CodebookMatMul: ONNX Gemm / MatMul whose constant weight is
// stored as packed codebook indices (see onnx_codebook/schema.py).
#include "codebook_ops.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace onnx_codebook {

namespace {

// Activation rows of A (M x K, or K x M when transposed) packed into kMR panels.
void PackActivationPanels(const float* a, int64_t M, int64_t K, bool trans, int64_t i0, int64_t mi, int64_t k0,
                          int64_t kc, float* dst) {
  for (int64_t p = 0; p * kMR < mi; ++p) {
    float* panel = dst + p * kMR * kc;
    const int64_t live = std::min(kMR, mi - p * kMR);
    const int64_t row0 = i0 + p * kMR;
    for (int64_t r = live; r < kMR; ++r)
      for (int64_t k = 0; k < kc; ++k) panel[k * kMR + r] = 0.f;
    if (!trans) {
      for (int64_t r = 0; r < live; ++r) {
        const float* src = a + (row0 + r) * K + k0;
        for (int64_t k = 0; k < kc; ++k) panel[k * kMR + r] = src[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a + (k0 + k) * M + row0;
        for (int64_t r = 0; r < live; ++r) panel[k * kMR + r] = src[r];
      }
    }
  }
}

}  // namespace

// y[M, N] = act(y + alpha * op(A) * W^T), W the codebook weight with N rows of K entries (y's contents
// ignored when !y_holds_values).
void WeightMatMul(const CodebookWeight& w, const float* a, int64_t M, bool trans_a, float alpha, const Epilogue& act,
                  float* y, const OrtKernelContext* ctx, bool y_holds_values) {
  const int64_t N = w.rows, K = w.cols;
  if (M <= 0 || N <= 0) return;
  constexpr int64_t kSmallM = 8;
  if (M <= kSmallM) {
    if (!y_holds_values) std::fill(y, y + M * N, 0.f);
    // Few rows: decode each weight row once and reduce it against all rows of A.
    // Rows 16 floats longer than the padded weight rows: power-of-two strides would put
    // the same column of every row into one L1 set.
    const int64_t lda = w.cols_padded + 16;
    std::vector<float> padded(static_cast<size_t>(M * lda), 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) padded[m * lda + k] = trans_a ? a[k * M + m] : a[m * K + k];
    const int64_t block = std::max<int64_t>(16, std::min<int64_t>(256, (N + 7) / 8));
    const int64_t tasks = (N + block - 1) / block;
    ParallelFor(ctx, tasks, [&](int64_t t) {
      const int64_t r0 = t * block, r1 = std::min(N, r0 + block);
      RowsTimesWeight(w, padded.data(), lda, M, r0, r1, alpha, y, N, 1, act);
    });
    return;
  }
  GemmSpec s;
  s.M = M;
  s.N = N;
  s.K = K;
  s.alpha = alpha;
  s.block_m = 192;
  s.block_n = 512;
  s.pack_a_cost = 0.3;  // copying activations
  s.pack_b_cost = 1.0;  // decoding weights
  s.pack_a = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
    PackActivationPanels(a, M, K, trans_a, i0, mi, k0, kc, dst);
  };
  s.pack_b = [&](int64_t j0, int64_t nj, int64_t k0, int64_t kc, float* dst) {
    PackWeightPanels(w, 0, j0, nj, k0, kc, kNR, dst);
  };
  if (!trans_a) {
    // rows of A copied as they are, row r at dst + r * kKC; the rows past mi of the
    // last panel pair are zero (the kernel reads them, and stores none of their sums)
    s.prefer_rows_a = true;
    s.pack_a_rows = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
      const int64_t rows = (mi + kMR - 1) / kMR * kMR;
      for (int64_t r = 0; r < rows; ++r) {
        float* out = dst + r * kKC;
        if (r < mi) {
          std::memcpy(out, a + (i0 + r) * K + k0, static_cast<size_t>(kc) * sizeof(float));
        } else {
          std::fill_n(out, kc, 0.f);
        }
      }
    };
  }
  s.c = y;
  s.init_c = !y_holds_values;  // the first write overwrites y (no zero fill beforehand)
  s.act = act;
  s.row_stride = N;
  RunGemm(s, ctx);
}

// ------------------------------------------------------------------ CodebookGemm

GemmKernel::GemmKernel(const OrtKernelInfo* info, bool matmul) : op_(matmul ? kMatMulName : kGemmName), matmul_(matmul) {
  if (!matmul_) {
    alpha_ = AttrFloat(info, "alpha", 1.f);
    beta_ = AttrFloat(info, "beta", 1.f);
    trans_a_ = AttrInt(info, "transA", 0) != 0;
    trans_b_ = AttrInt(info, "transB", 0) != 0;
  }
  act_ = ReadEpilogue(info, op_);
  weight_ = LoadCodebookWeight(info, op_, trans_b_ ? ChannelAxis::kFirst : ChannelAxis::kLast, nullptr);
}

OrtStatus* GemmKernel::ComputeV2(OrtKernelContext* context) noexcept {
  return GuardStatus(op_.c_str(), [&] { matmul_ ? ComputeMatMul(context) : ComputeGemm(context); });
}

void GemmKernel::ComputeGemm(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  auto input = ctx.GetInput(0);
  const std::vector<int64_t> a_shape = input.GetTensorTypeAndShapeInfo().GetShape();
  if (a_shape.size() != 2) Fail(op_, "input A must be 2-D, got shape " + ShapeString(a_shape));
  const int64_t M = trans_a_ ? a_shape[1] : a_shape[0];
  const int64_t K = trans_a_ ? a_shape[0] : a_shape[1];
  const int64_t N = weight_.rows;
  if (K != weight_.cols) {
    Fail(op_, "input A has shape " + ShapeString(a_shape) + " but the weight has K=" + std::to_string(weight_.cols));
  }
  auto output = ctx.GetOutput(0, std::vector<int64_t>{M, N});
  float* y = output.GetTensorMutableData<float>();
  bool y_holds_c = false;  // y = beta * C, or nothing yet

  if (ctx.GetInputCount() > 3) {
    auto c_input = ctx.GetInput(3);
    if (c_input != nullptr && beta_ != 0.f) {
      const std::vector<int64_t> c_shape = c_input.GetTensorTypeAndShapeInfo().GetShape();
      int64_t cm = 1, cn = 1;
      if (c_shape.size() == 1) {
        cn = c_shape[0];
      } else if (c_shape.size() == 2) {
        cm = c_shape[0];
        cn = c_shape[1];
      } else if (!c_shape.empty()) {
        Fail(op_, "input C must have rank <= 2, got shape " + ShapeString(c_shape));
      }
      if ((cm != 1 && cm != M) || (cn != 1 && cn != N)) {
        Fail(op_, "input C of shape " + ShapeString(c_shape) + " does not broadcast to [" + std::to_string(M) + ", " +
                      std::to_string(N) + "]");
      }
      const float* c = c_input.GetTensorData<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] = beta_ * c[(cm == 1 ? 0 : m) * cn + (cn == 1 ? 0 : n)];
      y_holds_c = true;
    }
  }
  WeightMatMul(weight_, input.GetTensorData<float>(), M, trans_a_, alpha_, act_, y, context, y_holds_c);
}

void GemmKernel::ComputeMatMul(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  auto input = ctx.GetInput(0);
  const std::vector<int64_t> a_shape = input.GetTensorTypeAndShapeInfo().GetShape();
  if (a_shape.empty()) Fail(op_, "input A must have rank >= 1");
  const int64_t K = a_shape.back();
  if (K != weight_.cols) {
    Fail(op_, "input A has shape " + ShapeString(a_shape) + " but the weight has K=" + std::to_string(weight_.cols));
  }
  std::vector<int64_t> y_shape(a_shape.begin(), a_shape.end() - 1);
  y_shape.push_back(weight_.rows);
  const int64_t rows = a_shape.size() == 1 ? 1 : ShapeSize(std::vector<int64_t>(a_shape.begin(), a_shape.end() - 1));
  auto output = ctx.GetOutput(0, y_shape);
  float* y = output.GetTensorMutableData<float>();
  WeightMatMul(weight_, input.GetTensorData<float>(), rows, false, 1.f, act_, y, context, false);
}

}  // namespace onnx_codebook
