// Compute kernels: weight decoding, a small-M row kernel and a blocked GEMM whose
// weight operand is decoded panel by panel (the whole layer is never expanded).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "op_common.h"

namespace onnx_codebook {

// Micro-tile of the blocked GEMM: MR rows of A (broadcast) x NR columns of B (vector):
// one AVX-512 kernel of 6 x 32, or two AVX2 kernels of 6 x 16.
inline constexpr int64_t kMR = 6;
inline constexpr int64_t kNR = 32;
inline constexpr int64_t kKC = 256;

// True when the AVX2/FMA/BMI2 kernels are used (decided once, at load time).
bool UsesAvx2();
// True when the AVX-512 GEMM micro-kernel is used (with the AVX2 decoders).
bool UsesAvx512();

// Decodes weight row `r`, entries [k0, k0 + count), k0 % 8 == 0, into out
// (room for count rounded up to 8).
void DecodeRow(const CodebookWeight& w, int64_t r, int64_t k0, int64_t count, float* out);

// dst[i] = act(src[i] + add[i]) for i < n (add may be null; src may be dst), vectorised.
void StoreActivated(const Epilogue& act, const float* src, const float* add, float* dst, int64_t n);

// Floats past the end of their output that the packers (PackWeightPanels and the
// GEMM's pack_a / pack_b) may write: buffers they fill are this much longer.
inline constexpr int64_t kPackSlack = 8 * kNR + 8;

// Packs rows [row0 + i0, row0 + i0 + n) x cols [k0, k0 + kc) of the weight into
// panels of `width` rows: panel p holds [kc][width], rows past n are zero.
void PackWeightPanels(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0, int64_t kc,
                      int64_t width, float* dst);

// Decodes rows [row0 + i0, row0 + i0 + n) x cols [k0, k0 + kc) of the weight as
// rows of dst, row r at dst + r * kKC (k0 % 8 == 0, kc <= kKC).
void PackWeightRows(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0, int64_t kc, float* dst);

// y[m * ldy + r * ldr] = act(that + alpha * sum_c a[m * lda + c] * w(r, c)) for
// m < rows_a (<= 8) and r in [r0, r1).  `a` rows hold w.cols_padded floats, zero past w.cols.
void RowsTimesWeight(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0, int64_t r1,
                     float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act);

// C(i, j) += alpha * sum_k A(i, k) B(k, j) for i < M, j < N, with
// C(i, j) at c[i * row_stride + (j / col_div) * col_outer + j % col_div].
// pack_a(i0, mi, k0, kc, dst) writes ceil(mi / kMR) panels of [kc][kMR];
// pack_b(j0, nj, k0, kc, dst) writes ceil(nj / kNR) strips of [kc][kNR]; both zero-pad.
struct GemmSpec {
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.f;
  int64_t block_m = 96, block_n = 256;  // largest task tiles (multiples of kMR / kNR)
  double pack_a_cost = 1.0, pack_b_cost = 1.0;  // cycles per packed element, for tiling
  std::function<void(int64_t, int64_t, int64_t, int64_t, float*)> pack_a;
  std::function<void(int64_t, int64_t, int64_t, int64_t, float*)> pack_b;
  // With a direct B, used on the AVX-512 path instead of pack_a: writes A as rows,
  // row i at dst + i * kKC (PackWeightRows), for which no transposing is needed.
  std::function<void(int64_t, int64_t, int64_t, int64_t, float*)> pack_a_rows;
  // Use pack_a_rows on the AVX-512 path with a packed B too.
  bool prefer_rows_a = false;
  float* c = nullptr;
  // init_c: C holds garbage and is overwritten with row_bias[i] (or 0) + alpha * A B.
  bool init_c = false;
  const float* row_bias = nullptr;
  // With init_c, also added on the first write: add[] is indexed like c[] (a residual).
  const float* add = nullptr;
  // Applied to every element of C on its last write (the last reduction block).
  Epilogue act;
  int64_t row_stride = 0;
  int64_t col_div = INT64_MAX;
  int64_t col_outer = 0;
  // Direct B (optional): B(k, j) = b_direct[b_offsets[k] + j], read in place by the
  // AVX-512 micro-kernel (no packing; pack_b may be null, pack_a_rows must be set).
  // Elsewhere it is packed from there.  Only columns j < N are read.
  const float* b_direct = nullptr;
  const int64_t* b_offsets = nullptr;
};

// Pixel-major GEMM for convolutions on small planes (AVX-512 only): C = W B with the
// output pixels broadcast and 32 output channels in the vector lanes, so that a plane
// of 49 pixels is not padded to 64 columns.  B(k, g) = b[b_offsets[k] + g]; a tile is
// `length` (1..12) pixels, pixel i at B column grid + i * grid_step and C column
// out + i * out_step.  The tiles cover each of their C columns once, and a contiguous
// range of them unless some tile has out_step > 1.
// C(i, j) = act(bias[i] + add(i, j) + sum_k w(row0 + i, k) B(k, g)) at
// c[i * row_stride + (j / col_div) * col_outer + j % col_div], add indexed like c.
// A tile of class q >= 0 sums over k in k_lists[q] only (ascending): the other k read
// zero padding for each of its pixels.
struct PixelTile {
  int64_t grid = 0, out = 0, length = 0;
  int64_t grid_step = 1, out_step = 1;
  int32_t klass = -1;
};
struct PixelGemmSpec {
  const CodebookWeight* w = nullptr;
  int64_t row0 = 0, M = 0, K = 0;
  // Groups of a grouped convolution, all in one parallel loop: group g is the GEMM
  // above with weight rows row0 + g * M, B at b + g * group_b, and C, bias and add
  // rows shifted by g * M.
  int64_t groups = 1, group_b = 0;
  const float* b = nullptr;
  const int64_t* b_offsets = nullptr;
  const PixelTile* tiles = nullptr;
  int64_t num_tiles = 0;
  const std::vector<int32_t>* k_lists = nullptr;
  int64_t num_k_lists = 0;
  const float* bias = nullptr;
  const float* add = nullptr;
  Epilogue act;
  float* c = nullptr;
  int64_t row_stride = 0, col_div = INT64_MAX, col_outer = 0;
};
// HasPixelGemm: AVX-512 and not ONNX_CODEBOOK_PIXEL_GEMM=0; ForcePixelGemm:
// ONNX_CODEBOOK_PIXEL_GEMM=1, every convolution that can runs pixel-major (for testing).
bool HasPixelGemm();
bool ForcePixelGemm();
void RunPixelGemm(const PixelGemmSpec& spec, const OrtKernelContext* ctx);

// GEMM with at most kLaneColumns columns as the vector lanes (AVX-512 only): the C of
// RunPixelGemm, with B dense: B(k, j) = b[k * 16 + j] for j < columns (b_offsets and
// tiles unused).  The weights are decoded as rows and broadcast, nothing is transposed:
// on few columns that costs less than the pixel-major GEMM's transposed panels.
inline constexpr int64_t kLaneColumns = 16;
inline constexpr int64_t kLaneRows = 16;  // output channels per task
void RunLaneGemm(const PixelGemmSpec& spec, int64_t columns, const OrtKernelContext* ctx);

// Reduction block of the sparse-column GEMM (its weight panels: 32 x kSparseKC floats).
inline constexpr int64_t kSparseKC = 256;
// The nonzero entries of a B, per column: column j's are entries [j * stride, j * stride
// + count[j]) of ks (increasing k) and vals.
struct SparseColumns {
  std::vector<int32_t> ks;
  std::vector<float> vals;
  int64_t stride = 0, columns = 0, K = 0;
  std::vector<int64_t> count;
  // column j's first entry at or past k = b * kSparseKC: blocks[b * columns + j], for
  // b <= ceil(K / kSparseKC)
  std::vector<int64_t> blocks;
  // Room for `columns` columns of a K-deep B, all empty.
  void Reset(int64_t K, int64_t columns);
  // Column j's list so far ends where reduction block b starts.
  void MarkBlock(int64_t b, int64_t j) { blocks[b * columns + j] = j * stride + count[j]; }
};
// Lists the entries of B(k, j) = b[k * ld + j], k < K, j < n <= 16, that are not zero
// (NaN counts as not zero) as columns [first, first + n) of out.
void ListNonzeros(const float* b, int64_t ld, int64_t first, int64_t n, SparseColumns& out);
// GEMM against a sparse B (AVX-512 only): the C of RunPixelGemm
// (one group; b, b_offsets and tiles unused) with B given as lists.  Each block of 32
// output channels decodes its weights as transposed panels and sums the products of
// the listed entries only: after a Relu about half the inputs are zero, and padded taps
// are never listed.
void RunSparseGemm(const PixelGemmSpec& spec, const SparseColumns& b, const OrtKernelContext* ctx);
// HasSparseGemm: AVX-512 and not ONNX_CODEBOOK_SPARSE=0; ForceSparseGemm:
// ONNX_CODEBOOK_SPARSE=1, every convolution that can runs there (for testing).
bool HasSparseGemm();
bool ForceSparseGemm();
// How many of x[0, n) are not zero (NaN counts).
int64_t CountNonzeros(const float* x, int64_t n);

// Winograd F(2x2, 3x3) convolution (AVX-512): a 2-D 3x3 convolution with stride 1 and
// dilation 1, y = act(bias + add + conv(x, w)) in NCHW.  The input is
// cut into overlapping 4x4 tiles that give 2x2 outputs each, so a tile and channel
// pair costs 16 multiply-adds instead of 36; 32 output channels run in the vector
// lanes, their weights decoded and transformed 16 input channels at a time.
struct WinogradSpec {
  const float* x = nullptr;
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t pad_top = 0, pad_left = 0, out_h = 0, out_w = 0;
  int64_t threads = 1;  // threads of the pool, as far as known
  // The weight (w; M: all output channels, row r of w is output channel row0 + r),
  // bias, add, act, and where y goes, as for RunPixelGemm's C with col_div = out_h *
  // out_w (b, tiles and groups unused).
  PixelGemmSpec out;
  // Groups: channels / groups input channels each, and out.M / groups output channels,
  // which must be a multiple of 16 (half a vector pair).
  int64_t groups = 1;
};
// AVX-512 and not ONNX_CODEBOOK_WINOGRAD=0.
bool HasWinograd();
void RunWinogradConv(const WinogradSpec& spec, const OrtKernelContext* ctx);

// The columns t in [0, n) whose source column t * stride + first lies in [0, width):
// [lo, hi), for PaddedRow.
struct ColumnRange {
  int64_t lo, hi;
};
inline ColumnRange InsideColumns(int64_t first, int64_t stride, int64_t width, int64_t n) {
  const int64_t lo = std::min(n, first >= 0 ? 0 : (-first + stride - 1) / stride);
  const int64_t hi = std::max(lo, std::min(n, width - first <= 0 ? 0 : (width - first + stride - 1) / stride));
  return {lo, hi};
}

// One zero-padded row: dst[t] = src[t * stride] for lo <= t < hi, 0 elsewhere in
// [0, n); src null: all zeros.
void PaddedRow(const float* src, int64_t lo, int64_t hi, int64_t stride, int64_t n, float* dst);

// dst[u * stride] += src[u] for u < n (stride >= 1): a transposed convolution's scatter.
void AddStrided(float* dst, const float* src, int64_t n, int64_t stride);

// dst[j] = src[offsets[j]] for j < n (<= 16), 0 where offsets[j] < 0; offsets holds
// 16 entries, all < reach (src has reach floats to read).
void GatherColumns(const float* src, int64_t reach, const int32_t* offsets, int64_t n, float* dst);
// GatherColumns for `taps` rows of ld (<= 16) columns: row t from offsets + t * span
// into dst + t * ld.  A source of at most 16 floats is loaded into a register once.
void GatherRows(const float* src, int64_t reach, const int32_t* offsets, int64_t span, int64_t taps, int64_t ld,
                float* dst);

// Geometry of a depthwise convolution of one plane.
struct DepthwisePlan {
  int64_t height, width, kh, kw, sh, sw, dh, dw, pad_top, pad_left, out_h, out_w;
  int64_t padded_h, phase_w;     // scratch layout, set by PlanDepthwise
  std::vector<int64_t> offsets;  // per tap: read offset of output (0, 0) in the scratch
};
DepthwisePlan PlanDepthwise(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w);
// y[out_h, out_w] = act(bias + z + conv(x[height, width], taps[kh, kw])) for one
// channel plane; z (same shape as y) may be null.
void DepthwisePlane(const DepthwisePlan& plan, const float* x, const float* taps, float bias, const float* z,
                    const Epilogue& act, float* y);

// True when DepthwiseChannels is available (AVX-512).
bool HasDepthwiseChannels();
// Depthwise convolution of `count` (<= 16) consecutive channel planes at once,
// vectorised across the channels (for small planes): plane c reads x + c * in_plane
// with taps[t * 16 + c] and writes y + c * out_plane = act(conv + bias[c] + z) (bias
// and z may be null; z is indexed like y).
void DepthwiseChannels(const DepthwisePlan& plan, int64_t count, const float* x, int64_t in_plane,
                       const float* taps, const float* bias, const float* z, const Epilogue& act, float* y,
                       int64_t out_plane);

// Scratch floats for one kernel call from onnxruntime's allocator for the context
// (its arena keeps the memory for the next run), or the heap when ctx is null.
// Uninitialised.
class CallBuffer {
 public:
  CallBuffer(const OrtKernelContext* ctx, size_t floats);
  ~CallBuffer();
  CallBuffer(const CallBuffer&) = delete;
  CallBuffer& operator=(const CallBuffer&) = delete;
  float* data() const { return data_; }

 private:
  OrtAllocator* allocator_ = nullptr;
  float* data_ = nullptr;
};

// Tasks a parallel loop should offer: the machine's threads, within [1, 64]; 1 inside
// an InlineParallelFor scope (where the loops run inline).
int64_t PoolWorkers();

// Thread-local scratch of at least n floats from buf (grown on demand, kept across
// calls), 64-byte aligned: a vector's own storage is only 16-byte aligned, and the
// AVX-512 kernels load whole 64-byte rows from these buffers.
float* Scratch(std::vector<float>& buf, size_t n);

// Runs a GEMM on onnxruntime's intra-op pool (serially when ctx is null).
void RunGemm(const GemmSpec& spec, const OrtKernelContext* ctx);

// Runs fn(i) for i < total on onnxruntime's intra-op pool; exceptions inside are
// caught and rethrown on the calling thread.  Runs serially on the calling thread
// when ctx is null, and inside an InlineParallelFor scope.
void ParallelFor(const OrtKernelContext* ctx, int64_t total, const std::function<void(int64_t)>& fn);

// fn(part) for each part in [0, parts), as tasks of one ParallelFor; each thread takes
// the same part in every call where it can (a thread that computed some rows of one
// layer then reads what it wrote when it computes the same rows of the next).
void ParallelParts(const OrtKernelContext* ctx, int64_t parts, const std::function<void(int64_t)>& fn);

// While one lives, ParallelFor calls on this thread run inline (for tasks that are
// parts of an outer parallel loop).
class InlineParallelFor {
 public:
  // on = false: no effect (for scopes that are inline only sometimes)
  explicit InlineParallelFor(bool on = true);
  ~InlineParallelFor();
  InlineParallelFor(const InlineParallelFor&) = delete;
  InlineParallelFor& operator=(const InlineParallelFor&) = delete;

 private:
  bool outer_;
};

// The most threads that ran the tasks of one ParallelFor called from this thread
// since ResetPoolThreadsSeen (1 if none ran on the pool): how many threads the
// session's pool has, as far as seen (the C API does not tell).
int64_t PoolThreadsSeen();
void ResetPoolThreadsSeen();

}  // namespace onnx_codebook
