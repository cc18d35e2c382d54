// CodebookConvTranspose: ONNX ConvTranspose (1-D and 2-D) whose constant weight is
// stored as packed codebook indices (see onnx_codebook/schema.py).
//
// Per image and group, the GEMM cols[m * K + t, p] = sum_c W[c, m, t] * X[c, p] (the
// weight decoded panel by panel as its rows (m, t) x input channels c, the input read
// in place) runs over a chunk of input pixels p; each column is then scattered into
// the output: input pixel (h, w) and kernel tap (i, j) land on output pixel
// (h * sh - pad_top + i * dh, w * sw - pad_left + j * dw), where it lies inside.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "codebook_ops.h"
#include "kernels.h"

namespace onnx_codebook {

namespace {

// Floats of the GEMM's output per chunk of input pixels (512 KB, within the L2 cache:
// 1 and 2 MB measured slower).
constexpr int64_t kColsFloats = int64_t{1} << 17;
// Input planes up to this many pixels run as activation rows against the weight rows.
constexpr int64_t kFewPixels = 16;

}  // namespace

ConvTransposeKernel::ConvTransposeKernel(const OrtKernelInfo* info) {
  act_ = ReadEpilogue(info, op_);
  group_ = AttrInt(info, "group", 1);
  if (group_ < 1) Fail(op_, "group must be >= 1, got " + std::to_string(group_));
  weight_ = LoadCodebookWeight(info, op_, ChannelAxis::kTransposedConv, &weight_shape_, group_);
  const size_t rank = weight_shape_.size();
  if (rank != 3 && rank != 4) {
    Fail(op_, "only 1-D and 2-D transposed convolutions are supported, weight_shape is " +
                  ShapeString(weight_shape_));
  }
  const size_t spatial = rank - 2;
  attrs_ = ReadConvAttributes(info, op_, weight_shape_);
  bool found = false;
  output_padding_ = AttrInts(info, "output_padding", &found);
  if (!found) output_padding_.assign(spatial, 0);
  if (output_padding_.size() != spatial) Fail(op_, "output_padding must have " + std::to_string(spatial) + " entries");
  for (int64_t extra : output_padding_) {
    if (extra < 0) Fail(op_, "output_padding must be >= 0");
  }
  const std::string auto_pad = AttrString(info, "auto_pad", "NOTSET");
  AttrInts(info, "output_shape", &found);
  if (auto_pad != "NOTSET" || found) {
    Fail(op_, "auto_pad and output_shape are not supported (explicit pads only): decompress the model or compress "
              "it in the standard format");
  }
}

OrtStatus* ConvTransposeKernel::ComputeV2(OrtKernelContext* context) noexcept {
  return GuardStatus(op_.c_str(), [&] { Compute(context); });
}

void ConvTransposeKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  auto input = ctx.GetInput(0);
  const std::vector<int64_t> x_shape = input.GetTensorTypeAndShapeInfo().GetShape();
  const size_t rank = weight_shape_.size(), spatial = rank - 2;
  if (x_shape.size() != rank) {
    Fail(op_, "input X has shape " + ShapeString(x_shape) + ", expected rank " + std::to_string(rank));
  }
  const int64_t batch = x_shape[0], channels = x_shape[1];
  if (channels != weight_shape_[0]) {
    Fail(op_, "input X has " + std::to_string(channels) + " channels, weight_shape " + ShapeString(weight_shape_) +
                  " needs " + std::to_string(weight_shape_[0]));
  }
  const int64_t cin_g = channels / group_, cout_g = weight_shape_[1], cout = cout_g * group_;
  // 1-D: one row (H = 1, a 1-tap kernel of stride 1)
  const bool two_d = spatial == 2;
  const int64_t height = two_d ? x_shape[2] : 1, width = x_shape[rank - 1];
  const ConvAttributes& a = attrs_;
  const int64_t kh = two_d ? a.kernel[0] : 1, kw = a.kernel[spatial - 1];
  const int64_t sh = two_d ? a.strides[0] : 1, sw = a.strides[spatial - 1];
  const int64_t dh = two_d ? a.dilations[0] : 1, dw = a.dilations[spatial - 1];
  const int64_t pad_top = two_d ? a.pads[0] : 0, pad_left = a.pads[spatial - 1];
  std::vector<int64_t> y_shape{batch, cout};
  for (size_t i = 0; i < spatial; ++i) {
    const int64_t size = x_shape[2 + i] == 0 ? 0
                         : TransposedAxis(x_shape[2 + i], a.kernel[i], a.strides[i], a.dilations[i], a.pads[i],
                                          a.pads[spatial + i], output_padding_[i]);
    if (x_shape[2 + i] > 0 && size < 1) {
      Fail(op_, "input X of shape " + ShapeString(x_shape) + " gives a non-positive output size on spatial axis " +
                    std::to_string(i) + " (pads too large)");
    }
    y_shape.push_back(size);
  }
  const int64_t out_h = two_d ? y_shape[2] : 1, out_w = y_shape[rank - 1];
  auto output = ctx.GetOutput(0, y_shape);
  float* y = output.GetTensorMutableData<float>();
  const float* bias = OptionalBias(ctx, op_, cout);
  const int64_t pixels = height * width, out_plane = out_h * out_w, taps = kh * kw;
  const int64_t planes = batch * cout;
  if (planes == 0 || out_plane == 0) return;
  const float* x = input.GetTensorData<float>();
  // Planes in blocks per task, so that small planes do not drown in scheduling.
  const int64_t per_task = std::max<int64_t>(1, 16384 / out_plane);
  auto for_planes = [&](int64_t first, int64_t count, const std::function<void(int64_t)>& fn) {
    ParallelFor(context, (count + per_task - 1) / per_task, [&](int64_t t) {
      for (int64_t q = first + t * per_task; q < std::min(first + count, first + (t + 1) * per_task); ++q) fn(q);
    });
  };
  for_planes(0, planes, [&](int64_t q) {
    std::fill_n(y + q * out_plane, out_plane, bias ? bias[q % cout] : 0.f);
  });

  const int64_t rows = cout_g * taps;
  auto finish = [&] {  // the activation, once every tap has been added
    if (!act_.Active()) return;
    for_planes(0, planes, [&](int64_t q) {
      float* plane = y + q * out_plane;
      StoreActivated(act_, plane, nullptr, plane, out_plane);
    });
  };
  // Scatters input pixels [p0, p0 + np) of image n from the group's GEMM output (row r
  // at src_rows + r * ld) into the output: each task owns whole output planes.
  auto scatter = [&](int64_t n, int64_t grp, const float* src_rows, int64_t ld, int64_t p0, int64_t np) {
    // Run by run of an input row, all taps of it, so that the few output rows one
    // input row reaches stay in the L1 cache.
    for_planes(0, cout_g, [&](int64_t m) {
      float* plane = y + (n * cout + grp * cout_g + m) * out_plane;
      for (int64_t p = 0; p < np;) {
        const int64_t h = (p0 + p) / width, w0 = (p0 + p) % width, run = std::min(width - w0, np - p);
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t i = t / kw, j = t % kw;
          const int64_t oh = h * sh - pad_top + i * dh;
          if (oh < 0 || oh >= out_h) continue;
          float* dst = plane + oh * out_w;
          const float* s = src_rows + (m * taps + t) * ld + p;
          const int64_t first = w0 * sw - pad_left + j * dw;  // output column of s[0]
          const auto [lo, hi] = InsideColumns(first, sw, out_w, run);
          if (lo < hi) AddStrided(dst + first + lo * sw, s + lo, hi - lo, sw);
        }
        p += run;
      }
    });
  };
  if (pixels <= kFewPixels) {
    // Few input pixels (a 1x1 or 4x4 input): the images of a slice of the batch side by
    // side, column (n, p), so that a 32-column GEMM strip is not mostly padding and the
    // weights are decoded once per slice.  Up to 16 columns run as activation rows
    // against the weight rows or, with AVX-512 and 9+ columns, as the lane GEMM (the
    // columns in the vector lanes; 8 measured faster as rows), more as one GEMM.
    const int64_t slice = std::clamp<int64_t>(kColsFloats * 4 / std::max<int64_t>(1, group_ * rows * pixels), 1, batch);
    const bool lanes = UsesAvx512() && slice * pixels > 8 && slice * pixels <= kLaneColumns;
    CallBuffer cols(context, static_cast<size_t>(group_ * rows * slice * pixels));
    CallBuffer xt(context, static_cast<size_t>(channels * std::max(slice * pixels, kLaneColumns)));  // [c][column]
    const int64_t lda = weight_.cols_padded + 16;  // as in WeightMatMul
    std::vector<float> a;
    std::vector<int64_t> offsets(static_cast<size_t>(cin_g));
    for (int64_t n0 = 0; n0 < batch; n0 += slice) {
      const int64_t count = std::min(slice, batch - n0), total = count * pixels;
      const int64_t ldx = lanes ? kLaneColumns : total;
      for (int64_t c = 0; c < channels; ++c) {
        float* row = xt.data() + c * ldx;
        std::fill_n(row, ldx, 0.f);
        for (int64_t n = 0; n < count; ++n) {
          std::copy_n(x + ((n0 + n) * channels + c) * pixels, pixels, row + n * pixels);
        }
      }
      if (lanes) {
        PixelGemmSpec spec;
        spec.w = &weight_;
        spec.M = rows;
        spec.K = cin_g;
        spec.groups = group_;
        spec.group_b = cin_g * kLaneColumns;
        spec.b = xt.data();
        spec.c = cols.data();
        spec.row_stride = total;
        RunLaneGemm(spec, total, context);
      } else if (total <= kLaneColumns) {
        a.assign(static_cast<size_t>(total * lda), 0.f);
        const int64_t block = std::max<int64_t>(16, std::min<int64_t>(256, (rows + 7) / 8));
        for (int64_t grp = 0; grp < group_; ++grp) {
          const int64_t row0 = grp * rows;
          for (int64_t c = 0; c < cin_g; ++c)
            for (int64_t j = 0; j < total; ++j) a[j * lda + c] = xt.data()[(grp * cin_g + c) * total + j];
          std::fill_n(cols.data() + row0 * total, rows * total, 0.f);
          ParallelFor(context, (rows + block - 1) / block, [&](int64_t task) {
            const int64_t r0 = row0 + task * block, r1 = std::min(row0 + rows, r0 + block);
            for (int64_t j0 = 0; j0 < total; j0 += 8) {
              RowsTimesWeight(weight_, a.data() + j0 * lda, lda, std::min<int64_t>(8, total - j0), r0, r1, 1.f,
                              cols.data() + j0, 1, total, Epilogue{});
            }
          });
        }
      } else {
        for (int64_t c = 0; c < cin_g; ++c) offsets[c] = c * total;
        for (int64_t grp = 0; grp < group_; ++grp) {
          const int64_t row0 = grp * rows;
          GemmSpec spec;
          spec.M = rows;
          spec.N = total;
          spec.K = cin_g;
          spec.block_m = 240;
          spec.block_n = std::max<int64_t>(512, total);
          spec.pack_a = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
            PackWeightPanels(weight_, row0, i0, mi, k0, kc, kMR, dst);
          };
          spec.pack_a_rows = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
            PackWeightRows(weight_, row0, i0, mi, k0, kc, dst);
          };
          spec.b_direct = xt.data() + grp * cin_g * total;
          spec.b_offsets = offsets.data();
          spec.init_c = true;
          spec.c = cols.data() + row0 * total;
          spec.row_stride = total;
          RunGemm(spec, context);
        }
      }
      for (int64_t n = 0; n < count; ++n) {
        for (int64_t grp = 0; grp < group_; ++grp) {
          scatter(n0 + n, grp, cols.data() + grp * rows * total + n * pixels, total, 0, pixels);
        }
      }
    }
  } else {
    const int64_t chunk = std::min(pixels, std::max(kNR, kColsFloats / std::max<int64_t>(1, rows) / kNR * kNR));
    CallBuffer cols(context, static_cast<size_t>(rows * chunk));
    std::vector<int64_t> offsets(static_cast<size_t>(cin_g));
    for (int64_t c = 0; c < cin_g; ++c) offsets[c] = c * pixels;
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t grp = 0; grp < group_; ++grp) {
        const int64_t row0 = grp * rows;
        for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
          const int64_t np = std::min(chunk, pixels - p0);
          GemmSpec spec;
          spec.M = rows;
          spec.N = np;
          spec.K = cin_g;
          spec.block_m = 240;
          spec.block_n = std::max<int64_t>(512, np);  // B is read in place: one tile decodes the weights once
          spec.pack_a = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
            PackWeightPanels(weight_, row0, i0, mi, k0, kc, kMR, dst);
          };
          spec.pack_a_rows = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
            PackWeightRows(weight_, row0, i0, mi, k0, kc, dst);
          };
          spec.b_direct = x + (n * channels + grp * cin_g) * pixels + p0;
          spec.b_offsets = offsets.data();
          spec.init_c = true;
          spec.c = cols.data();
          spec.row_stride = np;
          RunGemm(spec, context);
          scatter(n, grp, cols.data(), np, p0, np);
        }
      }
    }
  }
  finish();
}

}  // namespace onnx_codebook
