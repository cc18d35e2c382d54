// CodebookConv: ONNX Conv (1-D and 2-D) whose constant weight is stored as packed
// codebook indices (see onnx_codebook/schema.py).
//
// Grouped and dense convolutions run as an implicit GEMM per group over a chunk of
// images, Y_g[M_g, Q] = W_g[M_g, K_g] * col_g[K_g, Q], with the weight rows decoded on the
// fly and the im2col matrix never built: every row of it is a shifted view of a
// zero-padded, stride-phase-split copy of the images, which the GEMM reads in place
// (see PhaseConv).  The GEMM is either blocked over weight rows x strips of 32 grid
// columns, or, for small planes where those strips would be mostly padding (7x7:
// 49 pixels in 64 columns), pixel-major: runs of output pixels broadcast against
// 32 output channels in the vector lanes (AVX-512; PreferPixelGemm counts the
// multiply-adds of both).  Very few columns (N*P <= 16) run as weight rows against
// im2col columns, or, where most of those are zero, over each column's nonzero
// entries only (UseSparseColumns; 1x1 convolutions of up to 64 columns too, reading
// their input in place: UsePointwiseSparse).  Convolutions with one input channel
// per group (depthwise) run directly, plane by plane, or 16 channels at a time for
// planes up to 1024 pixels.
// 3x3 convolutions with stride 1 and at least 8 output tiles of 2x2 (dense, or
// grouped with a multiple of 16 output channels per group) run as Winograd F(2x2, 3x3)
// (AVX-512): 16 multiply-adds per tile and channel pair instead of 36, the weights
// decoded and transformed 16 input channels at a time.
//
// The epilogue (bias, residual Z, Relu / Clip) is applied where each output element
// is written for the last time.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "codebook_ops.h"
#include "kernels.h"

namespace onnx_codebook {

void ResolveAxis(const std::string& op, const std::string& auto_pad, int64_t in, int64_t kernel, int64_t stride,
                 int64_t dilation, int64_t pad_begin, int64_t pad_end, int64_t* out, int64_t* lead) {
  const int64_t span = (kernel - 1) * dilation + 1;
  if (auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER") {
    *out = (in + stride - 1) / stride;
    const int64_t total = std::max<int64_t>(0, (*out - 1) * stride + span - in);
    *lead = auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
    return;
  }
  if (auto_pad == "VALID") pad_begin = pad_end = 0;
  const int64_t padded = in + pad_begin + pad_end;
  if (padded < span) {
    Fail(op, "input size " + std::to_string(in) + " (padded " + std::to_string(padded) +
                 ") is smaller than the dilated kernel " + std::to_string(span));
  }
  *out = (padded - span) / stride + 1;
  *lead = pad_begin;
}

namespace {

// Geometry of one Conv call, normalised to two spatial axes (1-D uses H = 1).
struct ConvGeometry {
  int64_t batch = 0, channels = 0, height = 1, width = 0;
  int64_t out_channels = 0, group = 1, cin_per_group = 0, cout_per_group = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pad_top = 0, pad_left = 0;
  int64_t out_h = 1, out_w = 0;
};

// Output planes up to this size run depthwise 16 channels at a time.
constexpr int64_t kSmallPlane = 1024;

// Depthwise-style convolution: every output channel reads a single input channel.
// y = act(conv + bias + z); bias and z may be null.
void DirectConv(const CodebookWeight& w, const ConvGeometry& g, const float* x, const float* bias, const float* z,
                const Epilogue& act, float* y, const OrtKernelContext* ctx) {
  const int64_t planes = g.batch * g.out_channels;
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  const DepthwisePlan plan = PlanDepthwise(g.height, g.width, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.pad_top,
                                           g.pad_left, g.out_h, g.out_w);
  if (HasDepthwiseChannels() && g.cout_per_group == 1 && out_plane <= kSmallPlane) {
    // Small planes: 16 channels at a time, vectorised across channels.
    // Work units are (channel block, image), block-major, so that a task decodes each
    // block's taps once for its run of images.
    const int64_t blocks = (g.out_channels + 15) / 16;
    const int64_t ntaps = g.kh * g.kw;
    const int64_t total = g.batch * blocks;
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8, total / 4));
    const int64_t tasks = (total + chunk - 1) / chunk;
    ParallelFor(ctx, tasks, [&](int64_t task) {
      thread_local std::vector<float> taps_buf;
      // [tap][16 channels], zero past the block's channels
      float* taps16 = Scratch(taps_buf, static_cast<size_t>(ntaps * 16 + kPackSlack));
      int64_t decoded = -1;
      for (int64_t u = task * chunk; u < std::min(total, (task + 1) * chunk); ++u) {
        const int64_t block = u / g.batch, n = u % g.batch, c0 = block * 16;
        const int64_t count = std::min<int64_t>(16, g.out_channels - c0);
        if (block != decoded) {
          PackWeightPanels(w, 0, c0, count, 0, ntaps, 16, taps16);
          decoded = block;
        }
        const int64_t out = (n * g.out_channels + c0) * out_plane;
        DepthwiseChannels(plan, count, x + (n * g.channels + c0) * in_plane, in_plane, taps16,
                          bias ? bias + c0 : nullptr, z ? z + out : nullptr, act, y + out, out_plane);
      }
    });
    return;
  }
  // Several planes per task so that small planes do not drown in scheduling.
  const int64_t work = std::max<int64_t>(1, out_plane * g.kh * g.kw);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(planes / 8 + 1, 32768 / work));
  const int64_t tasks = (planes + chunk - 1) / chunk;
  ParallelFor(ctx, tasks, [&](int64_t task) {
    thread_local std::vector<float> taps_buf;
    float* taps = Scratch(taps_buf, static_cast<size_t>(w.cols_padded));
    for (int64_t t = task * chunk; t < std::min(planes, (task + 1) * chunk); ++t) {
      const int64_t n = t / g.out_channels, co = t % g.out_channels;
      const int64_t ci = co / g.cout_per_group;  // cin_per_group == 1
      DecodeRow(w, co, 0, w.cols, taps);
      const int64_t out = (n * g.out_channels + co) * out_plane;
      DepthwisePlane(plan, x + (n * g.channels + ci) * in_plane, taps, bias ? bias[co] : 0.f, z ? z + out : nullptr,
                     act, y + out);
    }
  });
}

// Scratch matrices (im2col, phase grids) up to this many floats are filled on the
// calling thread (a round trip to the pool costs more on 2 threads); im2col matrices
// that one permute per 16 values fills (planes of at most 16 pixels, one image),
// up to 8 times that.
constexpr int64_t kSerialFloats = int64_t{1} << 12;

// Output columns (batch * out_h * out_w) up to which a convolution runs as rows of
// the weight against blocks of 8 im2col columns (each weight row decoded once per
// block) instead of as a blocked GEMM.
constexpr int64_t kFewColumns = 16;

// Few output columns: y[n, r, p] = act(bias + z + sum_k w(r, k) col_n(k, p)), with
// the im2col columns gathered explicitly (transposed, zero-padded to cols_padded).
void FewColumnsConv(const CodebookWeight& w, const ConvGeometry& g, const float* x, const float* bias,
                    const float* z, const Epilogue& act, float* y, const OrtKernelContext* ctx) {
  const int64_t P = g.out_h * g.out_w, taps = g.kh * g.kw;
  const int64_t blocks_per_image = (P + 7) / 8;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t c = 0; c < g.out_channels; ++c) {
      float* yc = y + (n * g.out_channels + c) * P;
      const float* zc = z ? z + (n * g.out_channels + c) * P : nullptr;
      for (int64_t p = 0; p < P; ++p) yc[p] = (bias ? bias[c] : 0.f) + (zc ? zc[p] : 0.f);
    }
  }
  for (int64_t grp = 0; grp < g.group; ++grp) {
    // cols[n][block][m][cols_padded]: column p = block * 8 + m of image n
    std::vector<float> cols(static_cast<size_t>(g.batch * blocks_per_image * 8 * w.cols_padded), 0.f);
    for (int64_t n = 0; n < g.batch; ++n) {
      const float* xg = x + (n * g.channels + grp * g.cin_per_group) * g.height * g.width;
      for (int64_t p = 0; p < P; ++p) {
        float* col = cols.data() + (n * blocks_per_image * 8 + p) * w.cols_padded;
        const int64_t ih0 = (p / g.out_w) * g.sh - g.pad_top, iw0 = (p % g.out_w) * g.sw - g.pad_left;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = ih0 + i * g.dh;
          if (ih < 0 || ih >= g.height) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t iw = iw0 + j * g.dw;
            if (iw < 0 || iw >= g.width) continue;
            const float* src = xg + ih * g.width + iw;
            float* dst = col + i * g.kw + j;
            for (int64_t c = 0; c < g.cin_per_group; ++c) dst[c * taps] = src[c * g.height * g.width];
          }
        }
      }
    }
    const int64_t row0 = grp * g.cout_per_group, rows = g.cout_per_group;
    const int64_t block = std::max<int64_t>(8, std::min<int64_t>(128, (rows + 7) / 8));
    const int64_t tasks = (rows + block - 1) / block;
    ParallelFor(ctx, tasks, [&](int64_t t) {
      const int64_t r0 = row0 + t * block, r1 = std::min(row0 + rows, r0 + block);
      for (int64_t n = 0; n < g.batch; ++n) {
        for (int64_t b = 0; b < blocks_per_image; ++b) {
          const int64_t live = std::min<int64_t>(8, P - b * 8);
          const float* a = cols.data() + (n * blocks_per_image + b) * 8 * w.cols_padded;
          // y index of (column m, row r): n * out_channels * P + b * 8 + m + r * P
          RowsTimesWeight(w, a, w.cols_padded, live, r0, r1, 1.f, y + n * g.out_channels * P + b * 8, 1, P, act);
        }
      }
    });
  }
}

// C = act(W B + bias + z) of a convolution, for the pixel-major and lane GEMMs of all
// groups: group g reads B at b + g * group_b; y and z (may be null) point at the first
// image of the columns.
PixelGemmSpec ConvGemmSpec(const CodebookWeight& w, const ConvGeometry& g, const float* b, int64_t group_b,
                           const float* bias, const float* z, const Epilogue& act, float* y) {
  const int64_t P = g.out_h * g.out_w;
  PixelGemmSpec spec;
  spec.w = &w;
  spec.M = g.cout_per_group;
  spec.K = w.cols;
  spec.groups = g.group;
  spec.group_b = group_b;
  spec.b = b;
  spec.bias = bias;
  spec.add = z;
  spec.act = act;
  spec.c = y;
  spec.row_stride = P;
  spec.col_div = P;
  spec.col_outer = g.out_channels * P;
  return spec;
}

// The pixel-major GEMM of all groups over `num_tiles` tiles (with the tap lists of
// their classes, if any): group g reads B(k, column) at b + g * group_b + offsets[k] +
// column.
PixelGemmSpec PixelConvSpec(const CodebookWeight& w, const ConvGeometry& g, const float* b, int64_t group_b,
                            const int64_t* offsets, const PixelTile* tiles, int64_t num_tiles,
                            const std::vector<std::vector<int32_t>>* k_lists, const float* bias, const float* z,
                            const Epilogue& act, float* y) {
  PixelGemmSpec spec = ConvGemmSpec(w, g, b, group_b, bias, z, act, y);
  spec.b_offsets = offsets;
  spec.tiles = tiles;
  spec.num_tiles = num_tiles;
  if (k_lists) {
    spec.k_lists = k_lists->data();
    spec.num_k_lists = static_cast<int64_t>(k_lists->size());
  }
  return spec;
}

// Whether a convolution of at most 16 output columns (one group) runs on the
// sparse-column GEMM, which multiplies only the nonzero entries of the im2col
// matrix.  Their share is estimated
// as the input's nonzero share times the share of the matrix that reads inside the
// images (`from`: the gather table, -1 for padding).  Measured on one layer, 1 thread,
// with Relu'd inputs: against the lane GEMM (13-16 columns) it is faster up to about
// 0.45 (128 -> 256 3x3 on a 4x4 image: 0.079 / 0.094 / 0.114 ms at shares 0.21 / 0.35 /
// 0.52, against 0.105; 512 -> 512 1x1: 0.077 / 0.098 at 0.31 / 0.50, against 0.097);
// against the pixel-major GEMM (up to 12 columns) at any share up to about 0.75
// (256 -> 256 3x3 on a 3x3 image: 0.110-0.150 ms against 0.165; at 1.0, 0.168).  A
// codebook entry that is not finite keeps every product (0 * inf is NaN).
bool UseSparseColumns(const CodebookWeight& w, const ConvGeometry& g, const float* x, const std::vector<int32_t>& from,
                      int64_t span, int64_t columns, bool lanes) {
  if (!HasSparseGemm() || g.group != 1 || columns > kLaneColumns || !w.finite) return false;
  if (ForceSparseGemm()) return true;
  const int64_t taps = g.kh * g.kw, size = g.batch * g.channels * g.height * g.width;
  int64_t inside = 0;
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t col = 0; col < columns; ++col) inside += from[t * span + col] >= 0;
  }
  const double share = static_cast<double>(CountNonzeros(x, size)) / static_cast<double>(size) *
                       static_cast<double>(inside) / static_cast<double>(taps * columns);
  return share < (lanes ? 0.4 : 0.75);
}

// ConvGemmSpec for output channels [r0, r1) of a one-group convolution.
PixelGemmSpec RowsSpec(const CodebookWeight& w, const ConvGeometry& g, int64_t r0, int64_t r1, const float* b,
                       const float* bias, const float* z, const Epilogue& act, float* y) {
  const int64_t P = g.out_h * g.out_w;
  PixelGemmSpec spec = ConvGemmSpec(w, g, b, 0, bias ? bias + r0 : nullptr, z ? z + r0 * P : nullptr, act, y + r0 * P);
  spec.row0 = r0;
  spec.M = r1 - r0;
  return spec;
}

// A one-group convolution on the sparse-column GEMM, over the lists `list` makes of
// the im2col matrix's columns (all of them: batch * out_h * out_w).  On a pool of 2+
// threads each thread lists the entries itself and runs its share of the output
// channels, so that no thread reads what another wrote.
void SparseConv(const CodebookWeight& w, const ConvGeometry& g, const float* bias, const float* z, const Epilogue& act,
                float* y, int64_t threads, const OrtKernelContext* ctx,
                const std::function<void(SparseColumns&)>& list) {
  const int64_t blocks = (g.out_channels + 31) / 32;
  const int64_t parts = std::min(threads, blocks);
  ParallelFor(parts > 1 ? ctx : nullptr, parts, [&](int64_t part) {
    InlineParallelFor inline_here(parts > 1);
    thread_local SparseColumns lists;
    list(lists);
    const int64_t r0 = blocks * part / parts * 32, r1 = std::min(g.out_channels, blocks * (part + 1) / parts * 32);
    // with one part: its blocks over the pool
    RunSparseGemm(RowsSpec(w, g, r0, r1, nullptr, bias, z, act, y), lists, ctx);
  });
}

// Output columns (batch * pixels) up to which a 1x1 convolution with stride 1 and no
// padding may run on the sparse-column GEMM, its input read in place as the im2col
// matrix, and the input's nonzero share below which it does.  Measured on one layer,
// 1 thread, Relu'd inputs with nonzero shares 0.31 / 0.50 / 0.69, fused ms against the
// pixel-major GEMM's: 2048 -> 512 on one 7x7 image 0.67 / 0.98 / 1.31 against 1.03 (fp32
// 0.93); 256 -> 1024 on 7x7 0.18 / 0.25 / 0.33 against 0.27 (fp32 0.24); 512 -> 128 on
// 8x8 0.064 / 0.091 / 0.116 against 0.088 (fp32 0.086).
constexpr int64_t kSparseMaxColumns = 64;
constexpr double kPointwiseSparseShare = 0.45;

bool UsePointwiseSparse(const CodebookWeight& w, const ConvGeometry& g, const float* x) {
  const int64_t columns = g.batch * g.out_h * g.out_w;
  if (!HasSparseGemm() || g.group != 1 || !w.finite || g.kh != 1 || g.kw != 1 || g.sh != 1 || g.sw != 1 ||
      g.pad_top != 0 || g.pad_left != 0 || g.out_h != g.height || g.out_w != g.width || columns <= kLaneColumns ||
      columns > kSparseMaxColumns) {
    return false;
  }
  if (ForceSparseGemm()) return true;
  const int64_t size = g.batch * g.channels * g.height * g.width;
  return static_cast<double>(CountNonzeros(x, size)) < kPointwiseSparseShare * static_cast<double>(size);
}

// Few output columns (AVX-512): the im2col matrix is built explicitly, [k][column] over
// the whole batch, for the lane GEMM (columns as the vector lanes, row stride 16) or
// for the pixel-major GEMM, whose tiles of up to 12 columns then run across output
// rows and images (a 4x4 plane would otherwise give runs of 4).
void Im2colPixelConv(const CodebookWeight& w, const ConvGeometry& g, const float* x, const float* bias,
                     const float* z, const Epilogue& act, float* y, int64_t threads, const OrtKernelContext* ctx) {
  const int64_t P = g.out_h * g.out_w, columns = g.batch * P;
  // the pixel-major tiles hold up to 12 columns: past that the lanes are fuller
  // (at 9-12 columns the pixel-major GEMM measured faster)
  const bool lanes = columns > 12 && columns <= kLaneColumns;
  const int64_t ld = lanes ? 16 : columns;  // row stride of the im2col matrix
  // where column j of tap (i, j) reads, from the first input channel of the batch's
  // first image; -1: padding
  const int64_t taps = g.kh * g.kw, in_plane = g.height * g.width;
  const int64_t span = (ld + 15) / 16 * 16;  // table entries per tap
  std::vector<int32_t> from(static_cast<size_t>(taps * span), -1);
  int64_t reach = 0;  // floats read from a channel's start
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      for (int64_t col = 0; col < columns; ++col) {
        const int64_t n = col / P, oh = col % P / g.out_w, ow = col % g.out_w;
        const int64_t ih = oh * g.sh - g.pad_top + i * g.dh, iw = ow * g.sw - g.pad_left + j * g.dw;
        if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
          const int64_t at = n * g.channels * in_plane + ih * g.width + iw;
          from[(i * g.kw + j) * span + col] = static_cast<int32_t>(at);
          reach = std::max(reach, at + 1);
        }
      }
    }
  }
  // input channels (of all groups) split over the pool, unless the matrix is small
  // (a round trip to the pool costs more on 2 threads)
  const int64_t planes = g.group * g.cin_per_group;
  const int64_t tasks = std::min(planes, 4 * PoolWorkers());
  const bool serial = g.group * w.cols * ld <= (reach <= 16 ? 8 : 1) * kSerialFloats;
  auto gather = [&](int64_t t, int64_t tasks, float* dst) {
    for (int64_t gc = planes * t / tasks; gc < planes * (t + 1) / tasks; ++gc) {
      GatherRows(x + gc * in_plane, reach, from.data(), span, taps, ld,
                 dst + (gc / g.cin_per_group * w.cols + gc % g.cin_per_group * taps) * ld);
    }
  };
  if (UseSparseColumns(w, g, x, from, span, columns, lanes)) {
    SparseConv(w, g, bias, z, act, y, threads, ctx, [&](SparseColumns& lists) {
      thread_local std::vector<float> own;
      float* cols = Scratch(own, static_cast<size_t>(w.cols * ld));
      gather(0, 1, cols);
      lists.Reset(w.cols, columns);
      ListNonzeros(cols, ld, 0, columns, lists);
    });
    return;
  }
  const int64_t lane_blocks = (g.cout_per_group + kLaneRows - 1) / kLaneRows;
  if (lanes && serial && threads >= 2 && g.group == 1 && lane_blocks >= 2) {
    // Small and on a pool of 2+ threads: each thread gathers the whole matrix itself
    // and runs its share of the output channels, so that no thread reads what
    // another wrote.
    const int64_t parts = std::min(threads, lane_blocks);
    ParallelFor(ctx, parts, [&](int64_t part) {
      InlineParallelFor inline_here;
      thread_local std::vector<float> own;
      float* mine = Scratch(own, static_cast<size_t>(w.cols * ld));
      gather(0, 1, mine);
      const int64_t r0 = lane_blocks * part / parts * kLaneRows;
      const int64_t r1 = std::min(g.cout_per_group, lane_blocks * (part + 1) / parts * kLaneRows);
      RunLaneGemm(RowsSpec(w, g, r0, r1, mine, bias, z, act, y), columns, ctx);
    });
    return;
  }
  CallBuffer cols(ctx, static_cast<size_t>(g.group * w.cols * ld));  // [group][k][column]
  ParallelFor(serial ? nullptr : ctx, tasks, [&](int64_t t) { gather(t, tasks, cols.data()); });
  if (lanes) {
    RunLaneGemm(ConvGemmSpec(w, g, cols.data(), w.cols * ld, bias, z, act, y), columns, ctx);
    return;
  }
  std::vector<int64_t> offsets(static_cast<size_t>(w.cols));
  for (int64_t k = 0; k < w.cols; ++k) offsets[k] = k * columns;
  std::vector<PixelTile> tiles;
  const int64_t pieces = (columns + 11) / 12;
  for (int64_t i = 0, at = 0; i < pieces; ++i) {
    const int64_t length = columns / pieces + (i < columns % pieces ? 1 : 0);
    tiles.push_back({at, at, length});
    at += length;
  }
  RunPixelGemm(PixelConvSpec(w, g, cols.data(), w.cols * ld, offsets.data(), tiles.data(),
                             static_cast<int64_t>(tiles.size()), nullptr, bias, z, act, y),
               ctx);
}

// Implicit-GEMM convolution without im2col.  The batch is copied once, zero-padded
// and split into sh * sw stride phases: phase (a, b) of channel c and image n holds
// padded pixel (r * sh + a, s * sw + b) at [r][s] of an Hq x Wq plane, laid out as
// [c][phase][n][Hq][Wq] (only the phases some tap reads are stored).  On the output
// grid q = n * Hq * Wq + oh * Wq + ow, tap (i, j) of channel c reads phase
// ((i dh) % sh, (j dw) % sw) at q + ((i dh) / sh) * Wq + (j dw) / sw, so every row k of
// the im2col matrix is the buffer shifted by a per-k offset, which the GEMM reads in
// place.  The blocked GEMM computes grid columns outside the output (ow >= out_w,
// oh >= out_h) and drops them; the pixel-major GEMM reads output pixels only.
class PhaseConv {
 public:
  // `images`: how many images of the batch one buffer holds.
  PhaseConv(const ConvGeometry& geom, int64_t images) : g(geom), images(images) {
    const int64_t span_h = (g.kh - 1) * g.dh + 1, span_w = (g.kw - 1) * g.dw + 1;
    const int64_t padded_h = (g.out_h - 1) * g.sh + span_h, padded_w = (g.out_w - 1) * g.sw + span_w;
    hq = (padded_h + g.sh - 1) / g.sh;
    wq = (padded_w + g.sw - 1) / g.sw;
    // 1x1, stride 1, unpadded, one image: the input itself is the grid.
    in_place = images == 1 && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.pad_top == 0 &&
               g.pad_left == 0 && g.out_h == g.height && g.out_w == g.width;
    if (in_place) {
      hq = g.height;
      wq = g.width;
    }
    image = hq * wq;
    phase_stride = images * image;
    // Only the stride phases that some tap reads are stored (a strided 1x1 reads one).
    const int64_t taps = g.kh * g.kw;
    slot.assign(static_cast<size_t>(g.sh * g.sw), -1);
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t phase = (i * g.dh % g.sh) * g.sw + j * g.dw % g.sw;
        if (slot[phase] < 0) slot[phase] = phases++;
      }
    }
    channel_stride = phases * phase_stride;
    columns = (images - 1) * image + g.out_h * wq;
    // Without junk columns the GEMM writes the output directly.
    grid_is_output = wq == g.out_w && (images == 1 || hq == g.out_h);
    offsets.resize(static_cast<size_t>(g.cin_per_group * taps));
    for (int64_t c = 0; c < g.cin_per_group; ++c) {
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ph = i * g.dh, pw = j * g.dw;
          const int64_t phase = (ph % g.sh) * g.sw + pw % g.sw;
          offsets[c * taps + i * g.kw + j] =
              c * channel_stride + slot[phase] * phase_stride + (ph / g.sh) * wq + pw / g.sw;
        }
      }
    }
    // Junk columns of the last image read up to (kw - 1) * dw / sw past its plane.
    buffer_size = g.channels * channel_stride + wq + 16;
  }

  // Copies images [n0, n0 + count) of x (count <= images) into the phase buffer,
  // (channel, image) planes split over the pool.
  void Fill(const float* x, int64_t n0, int64_t count, float* buf, const OrtKernelContext* ctx) const {
    FillRows(x, n0, count, 0, hq, buf, ctx);
  }

  // Fill, of grid rows [r0, r1) only (the rest of buf is left as it was).
  void FillRows(const float* x, int64_t n0, int64_t count, int64_t r0, int64_t r1, float* buf,
                const OrtKernelContext* ctx) const {
    const int64_t plane = g.height * g.width, planes = g.channels * count;
    const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, phases * image));
    ParallelFor(planes * phases * image <= kSerialFloats ? nullptr : ctx, (planes + block - 1) / block, [&](int64_t t) {
      for (int64_t cn = t * block; cn < std::min(planes, (t + 1) * block); ++cn) {
        const int64_t c = cn / count, n = cn % count;
        const float* src = x + ((n0 + n) * g.channels + c) * plane;
        for (int64_t a = 0; a < g.sh; ++a) {
          for (int64_t b = 0; b < g.sw; ++b) {
            if (slot[a * g.sw + b] < 0) continue;
            float* ph = buf + c * channel_stride + slot[a * g.sw + b] * phase_stride + n * image;
            // phase column s reads input column s * sw + b - pad_left
            const int64_t first = b - g.pad_left;
            const auto [lo, hi] = InsideColumns(first, g.sw, g.width, wq);
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t ih = r * g.sh + a - g.pad_top;
              PaddedRow(ih >= 0 && ih < g.height ? src + ih * g.width + first : nullptr, lo, hi, g.sw, wq, ph + r * wq);
            }
          }
        }
      }
    });
    std::fill(buf + g.channels * channel_stride, buf + buffer_size, 0.f);
  }

  const ConvGeometry& g;
  const int64_t images;
  bool in_place = false, grid_is_output = false;
  int64_t hq = 0, wq = 0, image = 0, phase_stride = 0, channel_stride = 0, columns = 0, buffer_size = 0;
  int64_t phases = 0;               // stored stride phases per channel
  std::vector<int64_t> slot;        // per stride phase a * sw + b: its place among them, -1 if unread
  std::vector<int64_t> offsets;     // per reduction index of a group
};

// Images per GEMM: as many as keep its output grid within this many floats (about
// the L2 cache).  More images decode each weight panel fewer times, but measured
// slower once the grid spills out of L2.
constexpr int64_t kGridFloats = int64_t{1} << 18;

// One image on a pool of 2+ threads is split by output rows or pixels rather than by
// output channels (each thread then decodes all of the weights) from this many output
// pixels: on the pixel-major GEMM over a phase grid from 8x8, on the blocked GEMM from
// 28x28.  Split by channels, each thread fills the whole grid; on this 2-vCPU VM that
// measured up to 2.5x slower in the phases where fp32 onnxruntime also slows down
// (fp32 digits CNN 0.11 instead of 0.085 ms), and no faster in the others.  Fused ms,
// one layer, split by channels -> by rows, slow phase / fast phase: 128 -> 128 3x3
// stride 2 on 28x28 0.86 -> 0.34 / 0.39 -> 0.32 (fp32 0.41 / 0.29); 256 -> 512 3x3
// stride 2 on 16x16 1.20 -> 0.86 / 0.83 -> 0.84 (fp32 0.78 / 0.71); 64 -> 128 5x5 on
// 12x12 0.34 -> 0.29 / 0.28 -> 0.27.  The blocked GEMM's 1x1 512 -> 512 on 8x8 measured
// slower split by pixels (0.17 -> 0.23 / 0.17 -> 0.19 ms), and 1024 -> 256 on 14x14 the
// same either way; an earlier round measured 256 -> 256 3x3 on 14x14 1.07 -> 1.11 ms.
constexpr int64_t kSpatialSplitPixels = 64, kSpatialSplitGemmPixels = 784;

// Tiles of the pixel-major GEMM over `count` images of the phase grid, with the
// reduction lists of the tiles that skip taps.
struct PixelPlan {
  std::vector<PixelTile> tiles;
  std::vector<std::vector<int32_t>> k_lists;
  double cost = 0;        // kernel steps, each weighted by its pixels plus its fixed cost
  double pixel_taps = 0;  // (pixel, tap) pairs summed over
};

// Tap (i, j) reads inside the image for some pixel of a tile when tap row i does for
// one of its output rows [oh0, oh1] and tap column j for one of its output columns
// [ow0, ow1]; the others read zero padding for every pixel, and the tile skips them.
class TapClasses {
 public:
  TapClasses(const ConvGeometry& g, PixelPlan& plan) : g_(g), plan_(plan) {}

  // The class of a tile spanning those output rows and columns (-1: it reads every
  // tap); `taps`: how many it reads.
  int32_t Of(int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1, int64_t* taps) {
    std::vector<bool> valid(static_cast<size_t>(g_.kh * g_.kw));
    *taps = 0;
    for (int64_t i = 0; i < g_.kh; ++i) {
      const bool row = Reaches(oh0, oh1, g_.sh, g_.dh, i, g_.pad_top, g_.height);
      for (int64_t j = 0; j < g_.kw; ++j) {
        valid[i * g_.kw + j] = row && Reaches(ow0, ow1, g_.sw, g_.dw, j, g_.pad_left, g_.width);
        *taps += valid[i * g_.kw + j];
      }
    }
    if (*taps == g_.kh * g_.kw) return -1;
    const auto [it, added] = ids_.try_emplace(valid, static_cast<int32_t>(plan_.k_lists.size()));
    if (added) {
      std::vector<int32_t> list;
      const int64_t taps_all = g_.kh * g_.kw;
      for (int64_t k = 0; k < g_.cin_per_group * taps_all; ++k) {
        if (valid[k % taps_all]) list.push_back(static_cast<int32_t>(k));
      }
      plan_.k_lists.push_back(std::move(list));
    }
    return it->second;
  }

 private:
  // Whether o * stride - pad + tap * dilation lies in [0, size) for some o in [o0, o1].
  static bool Reaches(int64_t o0, int64_t o1, int64_t stride, int64_t dilation, int64_t tap, int64_t pad,
                      int64_t size) {
    const int64_t shift = tap * dilation - pad;
    // the least o with o * stride + shift >= 0, and the greatest with it < size
    const int64_t first = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
    const int64_t last = size - 1 - shift < 0 ? -1 : (size - 1 - shift) / stride;
    return std::max(o0, first) <= std::min(o1, last);
  }

  const ConvGeometry& g_;
  PixelPlan& plan_;
  std::map<std::vector<bool>, int32_t> ids_;
};

// The fixed cost of a kernel step (the weight loads and the reduction index), in
// pixel-steps.
constexpr double kPixelStepCost = 1.5;

// Row tiles: runs of output pixels that are contiguous in the grid (a whole image when
// the grid has no junk columns, else an output row), each split evenly into tiles of
// at most 12.  A tile skips the tap rows that read padding for its output row.
PixelPlan RowTiles(const PhaseConv& pc, int64_t count) {
  const ConvGeometry& g = pc.g;
  const int64_t P = g.out_h * g.out_w;
  const bool whole = pc.wq == g.out_w;
  const int64_t run = whole ? P : g.out_w, runs = whole ? 1 : g.out_h;
  const int64_t pieces = (run + 11) / 12, base = run / pieces, longer = run % pieces;
  PixelPlan plan;
  TapClasses classes(g, plan);
  std::vector<PixelTile> image;  // the tiles of the first image
  for (int64_t r = 0; r < runs; ++r) {
    int64_t grid = r * pc.wq, out = r * g.out_w;
    for (int64_t i = 0; i < pieces; ++i) {
      const int64_t length = base + (i < longer ? 1 : 0);
      const int64_t first = out, last = out + length - 1;  // output pixels
      const bool one_row = first / g.out_w == last / g.out_w;
      int64_t taps = 0;
      const int32_t klass = classes.Of(first / g.out_w, last / g.out_w, one_row ? first % g.out_w : 0,
                                       one_row ? last % g.out_w : g.out_w - 1, &taps);
      image.push_back({grid, out, length, 1, 1, klass});
      plan.cost += static_cast<double>(taps) * (static_cast<double>(length) + kPixelStepCost);
      plan.pixel_taps += static_cast<double>(taps * length);
      grid += length;
      out += length;
    }
  }
  plan.cost *= static_cast<double>(count);
  plan.pixel_taps *= static_cast<double>(count);
  plan.tiles.reserve(image.size() * static_cast<size_t>(count));
  for (int64_t n = 0; n < count; ++n) {
    for (PixelTile tile : image) {
      tile.grid += n * pc.image;
      tile.out += n * P;
      plan.tiles.push_back(tile);
    }
  }
  return plan;
}

// Pixel tiles: one output pixel of up to 12 images, so that a tile skips exactly the
// taps that read padding for that pixel (on a 4x4 plane a 3x3 kernel reads 100 of
// its 144 taps).
PixelPlan PixelTilesAcrossImages(const PhaseConv& pc, int64_t count) {
  const ConvGeometry& g = pc.g;
  const int64_t P = g.out_h * g.out_w;
  const int64_t pieces = (count + 11) / 12, base = count / pieces, longer = count % pieces;
  PixelPlan plan;
  TapClasses classes(g, plan);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t oh = p / g.out_w, ow = p % g.out_w;
    int64_t taps = 0;
    const int32_t klass = classes.Of(oh, oh, ow, ow, &taps);
    for (int64_t i = 0, n = 0; i < pieces; ++i) {
      const int64_t length = base + (i < longer ? 1 : 0);
      plan.tiles.push_back({n * pc.image + oh * pc.wq + ow, n * P + p, length, pc.image, P, klass});
      plan.cost += static_cast<double>(taps) * (static_cast<double>(length) + kPixelStepCost);
      plan.pixel_taps += static_cast<double>(taps * length);
      n += length;
    }
  }
  return plan;
}

// The cheaper of the two tilings (ONNX_CODEBOOK_PIXEL_TILES=rows / images forces one).
PixelPlan PlanPixelTiles(const PhaseConv& pc, int64_t count) {
  static const char* forced = std::getenv("ONNX_CODEBOOK_PIXEL_TILES");
  const std::string force = forced ? forced : "";
  PixelPlan rows = RowTiles(pc, count);
  if (count < 2 || force == "rows") return rows;
  PixelPlan images = PixelTilesAcrossImages(pc, count);
  return force == "images" || images.cost < rows.cost ? images : rows;
}

// Whether the pixel-major GEMM (tiled as in `plan`) computes fewer multiply-adds than
// the blocked GEMM over the phase grid, which pads rows to pairs of 6 and grid
// columns to strips of 32, junk columns and padded taps included.  A 1x1 kernel's
// blocked GEMM measured about 10 % faster per multiply-add (256 -> 64 on 56x56,
// batch 8: 9.3 vs 10.4 ms), a 3x3 kernel's no faster (64 -> 64 on 56x56, batch 1:
// 2.39 vs 2.19 ms by pixel tiles that skip 1 % of the taps).
bool PreferPixelGemm(const PhaseConv& pc, int64_t count, const PixelPlan& plan) {
  if (!HasPixelGemm()) return false;
  if (ForcePixelGemm()) return true;
  const ConvGeometry& g = pc.g;
  const int64_t columns = (count - 1) * pc.image + g.out_h * pc.wq;
  const double blocked = static_cast<double>((g.cout_per_group + 5) / 6 * 6) *
                         static_cast<double>((columns + kNR - 1) / kNR * kNR);
  const double pixel = static_cast<double>((g.cout_per_group + 31) / 32 * 32) * plan.pixel_taps /
                       static_cast<double>(g.kh * g.kw);
  return (g.kh * g.kw == 1 ? 1.1 : 1.0) * pixel < blocked;
}

// Images per phase grid.
int64_t ImagesPerGrid(const ConvGeometry& g) {
  const PhaseConv one(g, 1);
  // A 1x1 convolution that reads its input in place runs image by image: copying the
  // batch into a phase buffer measured slower than decoding the weights per image.
  if (one.in_place) return 1;
  return std::clamp<int64_t>(kGridFloats / std::max<int64_t>(1, g.out_channels * one.image), 1, g.batch);
}

// The plan of a phase-grid convolution: images per grid, the grid, the tilings and
// the choices made from them, for one geometry.  Not movable (pc refers to g).
struct PhasePlan {
  explicit PhasePlan(const ConvGeometry& geom)
      : g(geom), images(ImagesPerGrid(g)), pc(g, images), full(PlanPixelTiles(pc, images)) {
    pixel_major = PreferPixelGemm(pc, images, full);
    if (g.batch % images != 0) last = PlanPixelTiles(pc, g.batch % images);
    // Whether the explicit im2col's pixel-major tiles (all taps, up to 12 columns
    // across rows and images) would cost less than these (which skip the taps that
    // read padding, per output row or per pixel across images).  512 -> 512 3x3 on
    // 2x2, batch 8: 1.72 ms by im2col, 1.12 ms by pixel tiles across images.
    const int64_t columns = g.batch * g.out_h * g.out_w, pieces = (columns + 11) / 12;
    const double im2col = static_cast<double>(g.kh * g.kw) *
                          (static_cast<double>(columns) + kPixelStepCost * static_cast<double>(pieces));
    const double phase = full.cost * static_cast<double>(g.batch) / static_cast<double>(images);
    prefer_im2col = !pixel_major || im2col < phase;
  }
  PhasePlan(const PhasePlan&) = delete;
  PhasePlan& operator=(const PhasePlan&) = delete;

  const ConvGeometry g;
  const int64_t images;
  const PhaseConv pc;
  PixelPlan full, last;  // tiles of a full grid of images, and of the last grid if shorter
  bool pixel_major = false, prefer_im2col = false;
};

bool SameGeometry(const ConvGeometry& a, const ConvGeometry& b) {
  return std::memcmp(&a, &b, sizeof(ConvGeometry)) == 0;
}

}  // namespace

// The plans of the last few geometries a kernel ran (the batch size or the image
// size may change between runs); planning a tiling costs about 8 % of a 32 -> 128
// 3x3 convolution on one 8x8 image.  Runs may be concurrent.
class ConvPlans {
 public:
  std::shared_ptr<const PhasePlan> Get(const ConvGeometry& g) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& plan : plans_) {
      if (SameGeometry(plan->g, g)) return plan;
    }
    auto plan = std::make_shared<const PhasePlan>(g);
    if (plans_.size() >= 8) plans_.erase(plans_.begin());
    plans_.push_back(plan);
    return plan;
  }

 private:
  std::mutex mutex_;
  std::vector<std::shared_ptr<const PhasePlan>> plans_;
};

namespace {

void PhaseGemmConv(const CodebookWeight& w, const PhasePlan& phase, const float* x, const float* bias, const float* z,
                   const Epilogue& act, float* y, int64_t threads, const OrtKernelContext* ctx) {
  const ConvGeometry& g = phase.g;
  const PhaseConv& pc = phase.pc;
  const int64_t P = g.out_h * g.out_w, images = phase.images;
  const bool pixel_major = phase.pixel_major;
  const int64_t blocks = (g.cout_per_group + 31) / 32;
  if (pixel_major && !pc.in_place && images == g.batch && threads >= 2 && g.group == 1 && blocks >= 2 &&
      g.channels * pc.channel_stride <= kSerialFloats) {
    // A small grid on a pool of 2+ threads: each thread fills the whole grid itself
    // and runs its share of the output channels, so that no thread reads what another
    // wrote.
    const int64_t parts = std::min(threads, blocks);
    ParallelFor(ctx, parts, [&](int64_t part) {
      InlineParallelFor inline_here;
      thread_local std::vector<float> own;
      float* grid = Scratch(own, static_cast<size_t>(pc.buffer_size));
      pc.Fill(x, 0, g.batch, grid, nullptr);
      const int64_t r0 = blocks * part / parts * 32, r1 = std::min(g.cout_per_group, blocks * (part + 1) / parts * 32);
      PixelGemmSpec spec = PixelConvSpec(w, g, grid, 0, pc.offsets.data(), phase.full.tiles.data(),
                                         static_cast<int64_t>(phase.full.tiles.size()), &phase.full.k_lists,
                                         bias ? bias + r0 : nullptr, z ? z + r0 * P : nullptr, act, y + r0 * P);
      spec.row0 = r0;
      spec.M = r1 - r0;
      RunPixelGemm(spec, ctx);
    });
    return;
  }
  const bool row_tiles = !phase.full.tiles.empty() && phase.full.tiles[0].out_step == 1 && pc.wq != g.out_w;
  if (pixel_major && !pc.in_place && g.batch == 1 && threads >= 2 && row_tiles && P >= kSpatialSplitPixels &&
      g.out_h >= 4 * threads) {  // rows to share (a 1-D convolution has one)
    // One large image on a pool of 2+ threads: each thread fills the grid rows its
    // output rows read, into its own buffer, and computes those rows for every output
    // channel (decoding all the weights itself): no thread reads grid data another
    // wrote, and each tends to compute the same rows in every layer (ParallelParts),
    // reading input mostly written by itself.
    const int64_t parts = threads;
    const int64_t reach = ((g.kh - 1) * g.dh) / g.sh;  // grid rows below an output row that its taps read
    ParallelParts(ctx, parts, [&](int64_t part) {
      InlineParallelFor inline_here;
      const int64_t oh0 = g.out_h * part / parts, oh1 = g.out_h * (part + 1) / parts;
      thread_local std::vector<float> own;
      float* mine = Scratch(own, static_cast<size_t>(pc.buffer_size));
      pc.FillRows(x, 0, 1, oh0, std::min(pc.hq, oh1 + reach), mine, nullptr);
      std::fill(mine + g.channels * pc.channel_stride, mine + pc.buffer_size, 0.f);
      const std::vector<PixelTile>& tiles = phase.full.tiles;
      auto first_of_row = [&](int64_t oh) {
        return std::lower_bound(tiles.begin(), tiles.end(), oh * g.out_w,
                                [](const PixelTile& t, int64_t col) { return t.out < col; }) - tiles.begin();
      };
      const int64_t t0 = first_of_row(oh0), t1 = first_of_row(oh1);
      // group g's channels start g * cin_per_group channel strides into the grid
      RunPixelGemm(PixelConvSpec(w, g, mine, g.cin_per_group * pc.channel_stride, pc.offsets.data(), tiles.data() + t0,
                                 t1 - t0, &phase.full.k_lists, bias, z, act, y),
                   ctx);
    });
    return;
  }
  std::unique_ptr<CallBuffer> buf, grid;
  if (!pc.in_place) buf = std::make_unique<CallBuffer>(ctx, static_cast<size_t>(pc.buffer_size));
  for (int64_t n0 = 0; n0 < g.batch; n0 += images) {
    const int64_t count = std::min(images, g.batch - n0);
    // A last, shorter chunk keeps the layout of a full one and has fewer columns;
    // its junk columns may read the unused image slots, and are dropped.
    const float* base = x + n0 * g.channels * g.height * g.width;
    if (buf) {
      pc.Fill(x, n0, count, buf->data(), ctx);
      base = buf->data();
    }
    float* y_n = y + n0 * g.out_channels * P;
    const float* z_n = z ? z + n0 * g.out_channels * P : nullptr;
    if (pixel_major) {
      const PixelPlan& plan = count == images ? phase.full : phase.last;
      RunPixelGemm(PixelConvSpec(w, g, base, g.cin_per_group * (pc.in_place ? g.height * g.width : pc.channel_stride),
                                 pc.offsets.data(), plan.tiles.data(), static_cast<int64_t>(plan.tiles.size()),
                                 &plan.k_lists, bias, z_n, act, y_n),
                   ctx);
      continue;
    }
    if (!pc.grid_is_output && !grid) {
      grid = std::make_unique<CallBuffer>(ctx, static_cast<size_t>(g.out_channels * pc.columns));
    }
    const int64_t columns = (count - 1) * pc.image + g.out_h * pc.wq;
    // Many groups: one parallel loop over them, each group's GEMM serial in its task
    // (a parallel GEMM per group would cost a round trip to the pool per group).
    const bool across_groups = g.group >= 2 * PoolWorkers();
    // grid columns [c0, c1) of group grp (c0 > 0 only where the grid is the output)
    auto run_columns = [&](int64_t grp, int64_t c0, int64_t c1) {
      const int64_t row0 = grp * g.cout_per_group;
      GemmSpec spec;
      spec.M = g.cout_per_group;
      spec.N = c1 - c0;
      spec.K = w.cols;
      spec.block_m = 240;
      spec.block_n = std::max<int64_t>(512, columns);  // B is not copied: one tile decodes the weights once
      spec.pack_a = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
        PackWeightPanels(w, row0, i0, mi, k0, kc, kMR, dst);
      };
      spec.pack_a_rows = [&](int64_t i0, int64_t mi, int64_t k0, int64_t kc, float* dst) {
        PackWeightRows(w, row0, i0, mi, k0, kc, dst);
      };
      spec.b_direct = base + grp * g.cin_per_group * (pc.in_place ? g.height * g.width : pc.channel_stride) + c0;
      spec.b_offsets = pc.offsets.data();
      spec.init_c = true;
      spec.row_bias = bias ? bias + row0 : nullptr;
      if (grid) {
        spec.c = grid->data() + row0 * pc.columns;
        spec.row_stride = pc.columns;
      } else {
        // column n * P + p of the grid is y[n][co][p]
        spec.c = y_n + row0 * P + c0;
        spec.row_stride = P;
        spec.col_div = P;
        spec.col_outer = g.out_channels * P;
        spec.add = z_n ? z_n + row0 * P + c0 : nullptr;
        spec.act = act;
      }
      RunGemm(spec, across_groups ? nullptr : ctx);
    };
    auto run_group = [&](int64_t grp) { run_columns(grp, 0, columns); };
    if (!grid && count == 1 && threads >= 2 && g.group == 1 && P >= kSpatialSplitGemmPixels) {
      // One large image on a pool of 2+ threads, output = grid: each thread computes
      // a range of pixels for every output channel (decoding all the weights itself),
      // the same range in every layer where it can (ParallelParts), so that it reads
      // mostly what it wrote.
      ParallelParts(ctx, threads, [&](int64_t part) {
        InlineParallelFor inline_here;
        const int64_t c0 = columns * part / threads / kNR * kNR;
        const int64_t c1 = part + 1 == threads ? columns : columns * (part + 1) / threads / kNR * kNR;
        if (c0 < c1) run_columns(0, c0, c1);
      });
      continue;
    }
    if (across_groups) {
      ParallelFor(ctx, g.group, run_group);
    } else {
      for (int64_t grp = 0; grp < g.group; ++grp) run_group(grp);
    }
    if (!grid) continue;
    // grid [co][n][Hq][Wq] -> y [n][co][out_h][out_w], adding Z and the activation
    const int64_t rows = g.out_channels * count;
    const int64_t block = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, P));
    ParallelFor(ctx, (rows + block - 1) / block, [&](int64_t t) {
      for (int64_t cn = t * block; cn < std::min(rows, (t + 1) * block); ++cn) {
        const int64_t co = cn / count, n = cn % count;
        const float* src = grid->data() + co * pc.columns + n * pc.image;
        float* dst = y_n + (n * g.out_channels + co) * P;
        const float* zc = z_n ? z_n + (n * g.out_channels + co) * P : nullptr;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const float* s = src + oh * pc.wq;
          float* d = dst + oh * g.out_w;
          StoreActivated(act, s, zc ? zc + oh * g.out_w : nullptr, d, g.out_w);
        }
      }
    });
  }
}

// 3x3 convolutions with stride 1 run as Winograd F(2x2, 3x3) (RunWinogradConv) from
// this many 2x2 output tiles (over the batch) and input channels per group.  Fewer tiles
// do not pay for transforming the weights: 128->256 on one 4x4 image (4 tiles) took
// 0.116 ms against 0.108 on the lane GEMM; 2 images 0.179 against 0.199; one 8x8
// image of 32->128 0.043 against 0.054; 256->256 on 14x14 1.35 against 2.19.
constexpr int64_t kWinogradMinTiles = 8, kWinogradMinChannels = 16;

// Winograd runs 32 output channels per vector pair, so it costs 16 multiply-adds per
// tile and channel pair times (output channels rounded up to 32) / (output channels),
// against the direct path's 36.  At 32 (16 output channels) it measured no faster
// (64->16 on 28x28) or slower (16->16 on 56x56: 1.32 against 1.18 of fp32; 128->8 on
// 14x14: 1.21 against 1.02), so it runs where that cost is at most 27 (3/4 of 36).
// Grouped convolutions need a multiple of 16 output channels per group, so that each
// half of a block lies in one group (ResNeXt's 512 -> 512 in 32 groups on 14x14: 0.86
// of fp32 against 1.49 on the direct paths, which filled half of the 32 lanes).
bool UseWinograd(const ConvGeometry& g) {
  if (!HasWinograd() || ForcePixelGemm() || g.kh != 3 || g.kw != 3 || g.sh != 1 || g.sw != 1 || g.dh != 1 ||
      g.dw != 1 || g.cin_per_group < kWinogradMinChannels || (g.group > 1 && g.cout_per_group % 16 != 0)) {
    return false;
  }
  const int64_t lanes = (g.out_channels + 31) / 32 * 32;
  return 16 * lanes <= 27 * g.out_channels &&
         g.batch * ((g.out_h + 1) / 2) * ((g.out_w + 1) / 2) >= kWinogradMinTiles;
}

// One convolution call on the kernel that fits its geometry.
void RunConv(const CodebookWeight& w, const ConvGeometry& g, const float* x, const float* bias, const float* z,
             const Epilogue& act, float* y, ConvPlans& plans, int64_t threads, const OrtKernelContext* ctx) {
  const int64_t P = g.out_h * g.out_w;
  if (g.group == 1 && g.out_h == 1 && g.out_w == 1 && g.kh == g.height && g.kw == g.width && g.pad_top == 0 &&
      g.pad_left == 0 && (g.kh == 1 || g.dh == 1) && (g.kw == 1 || g.dw == 1)) {
    // The window is the whole unpadded input (a classifier head over the last feature
    // map, a 1x1 convolution on a pooled 1x1 map): each image, as it lies in memory,
    // is a row of a fully connected layer's input ([cin][kh][kw], the weight's column
    // order).  y[n][co] = act(bias + z + sum_k w(co, k) x[n][k]).
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t co = 0; co < g.out_channels; ++co) {
        y[n * g.out_channels + co] = (bias ? bias[co] : 0.f) + (z ? z[n * g.out_channels + co] : 0.f);
      }
    }
    WeightMatMul(w, x, g.batch, false, 1.f, act, y, ctx);
    return;
  }
  if (g.cin_per_group == 1) {
    DirectConv(w, g, x, bias, z, act, y, ctx);
    return;
  }
  if (UseWinograd(g)) {
    WinogradSpec spec{x, g.batch, g.channels, g.height, g.width, g.pad_top, g.pad_left, g.out_h, g.out_w, threads,
                      ConvGemmSpec(w, g, nullptr, 0, bias, z, act, y), g.group};
    spec.out.M = g.out_channels;  // the output channels of all groups, in one run
    spec.out.groups = 1;
    RunWinogradConv(spec, ctx);
    return;
  }
  const int64_t columns = g.batch * P;
  if (UsePointwiseSparse(w, g, x)) {
    // the input is the im2col matrix: image n's columns are its pixels, ld = P
    SparseConv(w, g, bias, z, act, y, threads, ctx, [&](SparseColumns& lists) {
      lists.Reset(g.channels, columns);
      for (int64_t n = 0; n < g.batch; ++n) {
        for (int64_t j0 = 0; j0 < P; j0 += 16) {
          ListNonzeros(x + n * g.channels * P + j0, P, n * P + j0, std::min<int64_t>(16, P - j0), lists);
        }
      }
    });
    return;
  }
  // the explicit im2col's gather offsets are int32
  const bool small_input = g.batch * g.channels * g.height * g.width <= INT32_MAX;
  if (columns <= kFewColumns) {
    HasPixelGemm() && small_input ? Im2colPixelConv(w, g, x, bias, z, act, y, threads, ctx)
                                  : FewColumnsConv(w, g, x, bias, z, act, y, ctx);
    return;
  }
  // The phase grid's pixel-major tiles are runs of one output row (of one image when
  // the grid has no junk columns, i.e. the kernel span fits the stride), or one pixel
  // across images.  Where rows have at most 3 pixels and the batch is small, an
  // explicit im2col, whose tiles cross rows and images, can be cheaper (runs of 4
  // measured slower, and much slower on larger grids).
  const int64_t run = (g.kw - 1) * g.dw + 1 <= g.sw ? P : g.out_w;
  const std::shared_ptr<const PhasePlan> phase = plans.Get(g);
  if (HasPixelGemm() && small_input && run <= 3 && g.group * w.cols * columns <= kGridFloats && phase->prefer_im2col) {
    Im2colPixelConv(w, g, x, bias, z, act, y, threads, ctx);
    return;
  }
  PhaseGemmConv(w, *phase, x, bias, z, act, y, threads, ctx);
}

}  // namespace

ConvKernel::~ConvKernel() = default;

ConvAttributes ReadConvAttributes(const OrtKernelInfo* info, const std::string& op,
                                  const std::vector<int64_t>& weight_shape) {
  const size_t spatial = weight_shape.size() - 2;
  ConvAttributes a;
  a.kernel.assign(weight_shape.begin() + 2, weight_shape.end());
  bool found = false;
  const std::vector<int64_t> kernel_shape = AttrInts(info, "kernel_shape", &found);
  if (found && kernel_shape != a.kernel) {
    Fail(op, "kernel_shape " + ShapeString(kernel_shape) + " does not match weight_shape " + ShapeString(weight_shape));
  }
  a.strides = AttrInts(info, "strides", &found);
  if (!found) a.strides.assign(spatial, 1);
  a.dilations = AttrInts(info, "dilations", &found);
  if (!found) a.dilations.assign(spatial, 1);
  a.pads = AttrInts(info, "pads", &found);
  if (!found) a.pads.assign(2 * spatial, 0);
  if (a.strides.size() != spatial || a.dilations.size() != spatial || a.pads.size() != 2 * spatial) {
    Fail(op, "strides, dilations and pads must have " + std::to_string(spatial) + ", " + std::to_string(spatial) +
                 " and " + std::to_string(2 * spatial) + " entries");
  }
  for (size_t i = 0; i < spatial; ++i) {
    if (a.strides[i] < 1 || a.dilations[i] < 1) Fail(op, "strides and dilations must be >= 1");
    if (a.pads[i] < 0 || a.pads[i + spatial] < 0) Fail(op, "pads must be >= 0");
  }
  return a;
}

ConvKernel::ConvKernel(const OrtKernelInfo* info) : plans_(std::make_unique<ConvPlans>()) {
  act_ = ReadEpilogue(info, op_);
  weight_ = LoadCodebookWeight(info, op_, ChannelAxis::kFirst, &weight_shape_);
  const size_t rank = weight_shape_.size();
  if (rank != 3 && rank != 4) {
    Fail(op_, "only 1-D and 2-D convolutions are supported, weight_shape is " + ShapeString(weight_shape_));
  }
  attrs_ = ReadConvAttributes(info, op_, weight_shape_);
  auto_pad_ = AttrString(info, "auto_pad", "NOTSET");
  if (auto_pad_ != "NOTSET" && auto_pad_ != "SAME_UPPER" && auto_pad_ != "SAME_LOWER" && auto_pad_ != "VALID") {
    Fail(op_, "unknown auto_pad '" + auto_pad_ + "'");
  }
  group_ = AttrInt(info, "group", 1);
  if (group_ < 1 || weight_shape_[0] % group_ != 0) {
    Fail(op_, "group " + std::to_string(group_) + " does not divide the " + std::to_string(weight_shape_[0]) +
                  " output channels");
  }
}

OrtStatus* ConvKernel::ComputeV2(OrtKernelContext* context) noexcept {
  return GuardStatus(op_.c_str(), [&] { Compute(context); });
}

void ConvKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  auto input = ctx.GetInput(0);
  const std::vector<int64_t> x_shape = input.GetTensorTypeAndShapeInfo().GetShape();
  const size_t rank = weight_shape_.size();
  if (x_shape.size() != rank) {
    Fail(op_, "input X has shape " + ShapeString(x_shape) + ", expected rank " + std::to_string(rank));
  }
  ConvGeometry g;
  g.batch = x_shape[0];
  g.channels = x_shape[1];
  g.group = group_;
  g.out_channels = weight_shape_[0];
  g.cin_per_group = weight_shape_[1];
  g.cout_per_group = g.out_channels / group_;
  if (g.channels != g.cin_per_group * group_) {
    Fail(op_, "input X has " + std::to_string(g.channels) + " channels, weight_shape " + ShapeString(weight_shape_) +
                  " with group " + std::to_string(group_) + " needs " + std::to_string(g.cin_per_group * group_));
  }
  const bool two_d = rank == 4;
  const size_t s = rank - 2;
  g.width = x_shape[rank - 1];
  g.kw = attrs_.kernel[s - 1];
  g.sw = attrs_.strides[s - 1];
  g.dw = attrs_.dilations[s - 1];
  ResolveAxis(op_, auto_pad_, g.width, g.kw, g.sw, g.dw, attrs_.pads[s - 1], attrs_.pads[2 * s - 1], &g.out_w,
              &g.pad_left);
  if (two_d) {
    g.height = x_shape[2];
    g.kh = attrs_.kernel[0];
    g.sh = attrs_.strides[0];
    g.dh = attrs_.dilations[0];
    ResolveAxis(op_, auto_pad_, g.height, g.kh, g.sh, g.dh, attrs_.pads[0], attrs_.pads[2], &g.out_h, &g.pad_top);
  }
  std::vector<int64_t> y_shape{g.batch, g.out_channels};
  if (two_d) y_shape.push_back(g.out_h);
  y_shape.push_back(g.out_w);
  auto output = ctx.GetOutput(0, y_shape);
  float* y = output.GetTensorMutableData<float>();
  const int64_t P = g.out_h * g.out_w;

  const float* bias = OptionalBias(ctx, op_, g.out_channels);
  const float* z = nullptr;  // residual added before the activation
  if (ctx.GetInputCount() > 4) {
    auto z_input = ctx.GetInput(4);
    if (z_input != nullptr) {
      const std::vector<int64_t> z_shape = z_input.GetTensorTypeAndShapeInfo().GetShape();
      if (z_shape != y_shape) {
        Fail(op_, "input Z has shape " + ShapeString(z_shape) + ", expected the output shape " + ShapeString(y_shape));
      }
      z = z_input.GetTensorData<float>();
    }
  }
  if (g.batch == 0 || P == 0) return;
  const float* x = input.GetTensorData<float>();
  // With a pool of 2+ threads (seen in earlier runs), a batch that splits evenly runs
  // as one task per part of it, each convolving its images on its own thread: every
  // thread then fills, reads and writes only its images' data.  (Split by output
  // channels, every task reads all of the filled input, half of it written by the
  // other thread; where the two threads sit on different core complexes that cost
  // more than the convolution's arithmetic.)  Each part decodes the weights itself.
  const int64_t threads = pool_threads_.load(std::memory_order_relaxed);
  const int64_t parts = std::min(threads, g.batch);
  if (parts >= 2 && (g.batch % parts == 0 || g.batch >= 4 * parts)) {
    const int64_t in_image = g.channels * g.height * g.width, out_image = g.out_channels * P;
    ParallelFor(context, parts, [&](int64_t part) {
      InlineParallelFor inline_here;
      const int64_t n0 = g.batch * part / parts, n1 = g.batch * (part + 1) / parts;
      ConvGeometry images = g;
      images.batch = n1 - n0;
      RunConv(weight_, images, x + n0 * in_image, bias, z ? z + n0 * out_image : nullptr, act_, y + n0 * out_image,
              *plans_, 1, context);
    });
    return;
  }
  ResetPoolThreadsSeen();
  RunConv(weight_, g, x, bias, z, act_, y, *plans_, threads, context);
  if (PoolThreadsSeen() > threads) pool_threads_.store(PoolThreadsSeen(), std::memory_order_relaxed);
}

}  // namespace onnx_codebook
