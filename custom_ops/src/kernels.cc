#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "unpack.h"

#if defined(__x86_64__) || defined(_M_X64)
#define ONNX_CODEBOOK_X86 1
#include <immintrin.h>
#define AVX2_TARGET __attribute__((target("avx2,fma,bmi,bmi2")))
#else
#define ONNX_CODEBOOK_X86 0
#endif

namespace onnx_codebook {

namespace {

bool DetectAvx2() {
  // ONNX_CODEBOOK_PORTABLE=1 forces the portable kernels (for testing them).
  const char* portable = std::getenv("ONNX_CODEBOOK_PORTABLE");
  if (portable != nullptr && portable[0] == '1') return false;
#if ONNX_CODEBOOK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

const bool g_avx2 = DetectAvx2();

// Thread-local scratch, grown on demand and reused across calls.
float* Scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---------------------------------------------------------------- portable code

void DecodeRowPortable(const CodebookWeight& w, int64_t r, int64_t k0, int64_t count, float* out) {
  const uint8_t* row = w.Row(r);
  const float* lut = w.Lut(r);
  uint8_t idx[8];
  for (int64_t c = 0; c < count; c += 8) {
    ExpandEight(row + (k0 + c) / 8 * w.bits, w.bits, idx);
    for (int j = 0; j < 8; ++j) out[c + j] = lut[idx[j]];
  }
}

void RowsTimesWeightPortable(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0,
                             int64_t r1, float alpha, float* y, int64_t ldy) {
  float decoded[256];
  for (int64_t r = r0; r < r1; ++r) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < w.cols_padded; c0 += 256) {
      const int64_t n = std::min<int64_t>(256, w.cols_padded - c0);
      DecodeRowPortable(w, r, c0, n, decoded);
      for (int64_t m = 0; m < rows_a; ++m) {
        const float* am = a + m * lda + c0;
        float s = 0.f;
        for (int64_t c = 0; c < n; ++c) s += am[c] * decoded[c];
        acc[m] += s;
      }
    }
    for (int64_t m = 0; m < rows_a; ++m) y[m * ldy + r] += alpha * acc[m];
  }
}

void MicroKernelPortable(int64_t kc, const float* a, const float* b, int64_t ldb, float* tile) {
  float acc[kMR * kNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    for (int64_t i = 0; i < kMR; ++i) {
      const float ai = a[k * kMR + i];
      for (int64_t j = 0; j < kNR; ++j) acc[i * kNR + j] += ai * bk[j];
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
}

// ---------------------------------------------------------------- AVX2 code
#if ONNX_CODEBOOK_X86

enum class LutKind { kPermute8, kPermute16, kGather };

LutKind KindOf(const CodebookWeight& w) {
  return w.bits <= 3 ? LutKind::kPermute8 : w.bits == 4 ? LutKind::kPermute16 : LutKind::kGather;
}

// Eight decoded weights from the `bits` bytes at p.
template <LutKind kind>
AVX2_TARGET inline __m256 Decode8(const uint8_t* p, uint64_t lane_mask, __m256 lut_lo, __m256 lut_hi,
                                  const float* lut) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // rows carry 8 spare bytes at the end
  const uint64_t spread = _pdep_u64(v, lane_mask);
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(spread)));
  if constexpr (kind == LutKind::kPermute8) {
    (void)lut_hi;
    (void)lut;
    return _mm256_permutevar8x32_ps(lut_lo, idx);
  } else if constexpr (kind == LutKind::kPermute16) {
    (void)lut;
    const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    (void)lut_lo;
    (void)lut_hi;
    return _mm256_i32gather_ps(lut, idx, 4);
  }
}

template <LutKind kind>
AVX2_TARGET void DecodeRowAvx2(const CodebookWeight& w, int64_t r, int64_t k0, int64_t count, float* out) {
  const uint8_t* row = w.Row(r) + k0 / 8 * w.bits;
  const float* lut = w.Lut(r);
  const uint64_t mask = ByteLaneMask(w.bits);
  const __m256 lo = _mm256_loadu_ps(lut);
  const __m256 hi = kind == LutKind::kPermute16 ? _mm256_loadu_ps(lut + 8) : lo;
  for (int64_t c = 0; c < count; c += 8, row += w.bits) {
    _mm256_storeu_ps(out + c, Decode8<kind>(row, mask, lo, hi, lut));
  }
}

AVX2_TARGET inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row against M activation rows; U independent accumulators per row.
template <LutKind kind, int M, int U>
AVX2_TARGET void RowsTimesWeightAvx2(const CodebookWeight& w, const float* a, int64_t lda, int64_t r0, int64_t r1,
                                     float alpha, float* y, int64_t ldy) {
  const uint64_t mask = ByteLaneMask(w.bits);
  const int64_t blocks = w.cols_padded / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.Row(r);
    const float* lut = w.Lut(r);
    const __m256 lo = _mm256_loadu_ps(lut);
    const __m256 hi = kind == LutKind::kPermute16 ? _mm256_loadu_ps(lut + 8) : lo;
    __m256 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + U <= blocks; b += U) {
      for (int u = 0; u < U; ++u) {
        const __m256 wv = Decode8<kind>(row + (b + u) * w.bits, mask, lo, hi, lut);
        for (int m = 0; m < M; ++m) {
          acc[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + m * lda + (b + u) * 8), wv, acc[m][u]);
        }
      }
    }
    for (; b < blocks; ++b) {
      const __m256 wv = Decode8<kind>(row + b * w.bits, mask, lo, hi, lut);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + m * lda + b * 8), wv, acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = acc[m][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][u]);
      y[m * ldy + r] += alpha * HorizontalSum(s);
    }
  }
}

template <LutKind kind>
void RowsTimesWeightDispatch(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0,
                             int64_t r1, float alpha, float* y, int64_t ldy) {
  switch (rows_a) {
    case 1: return RowsTimesWeightAvx2<kind, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy);
    case 2: return RowsTimesWeightAvx2<kind, 2, 2>(w, a, lda, r0, r1, alpha, y, ldy);
    case 3: return RowsTimesWeightAvx2<kind, 3, 2>(w, a, lda, r0, r1, alpha, y, ldy);
    case 4: return RowsTimesWeightAvx2<kind, 4, 1>(w, a, lda, r0, r1, alpha, y, ldy);
    case 5: return RowsTimesWeightAvx2<kind, 5, 1>(w, a, lda, r0, r1, alpha, y, ldy);
    case 6: return RowsTimesWeightAvx2<kind, 6, 1>(w, a, lda, r0, r1, alpha, y, ldy);
    case 7: return RowsTimesWeightAvx2<kind, 7, 1>(w, a, lda, r0, r1, alpha, y, ldy);
    default: return RowsTimesWeightAvx2<kind, 8, 1>(w, a, lda, r0, r1, alpha, y, ldy);
  }
}

// Writes the 6x16 product to tile, or when c is set adds alpha times it to
// c[i * ldc + j] directly.
// With `first`, c is overwritten with alpha * product + bias[i] (bias may be null).
AVX2_TARGET void MicroKernelAvx2(int64_t kc, const float* a, const float* b, int64_t ldb, float* tile, float* c,
                                 int64_t ldc, float alpha, bool first = false, const float* bias = nullptr) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
    __m256 ai = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(ai, b0, c00);
    c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10);
    c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20);
    c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30);
    c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40);
    c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50);
    c51 = _mm256_fmadd_ps(ai, b1, c51);
  }
  if (c != nullptr) {
    const __m256 al = _mm256_set1_ps(alpha);
    const __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int i = 0; i < 6; ++i) {
      float* row = c + i * ldc;
      const __m256 c0 = first ? _mm256_set1_ps(bias ? bias[i] : 0.f) : _mm256_loadu_ps(row);
      const __m256 c1 = first ? c0 : _mm256_loadu_ps(row + 8);
      _mm256_storeu_ps(row, _mm256_fmadd_ps(al, acc[2 * i], c0));
      _mm256_storeu_ps(row + 8, _mm256_fmadd_ps(al, acc[2 * i + 1], c1));
    }
    return;
  }
  _mm256_storeu_ps(tile + 0, c00);
  _mm256_storeu_ps(tile + 8, c01);
  _mm256_storeu_ps(tile + 16, c10);
  _mm256_storeu_ps(tile + 24, c11);
  _mm256_storeu_ps(tile + 32, c20);
  _mm256_storeu_ps(tile + 40, c21);
  _mm256_storeu_ps(tile + 48, c30);
  _mm256_storeu_ps(tile + 56, c31);
  _mm256_storeu_ps(tile + 64, c40);
  _mm256_storeu_ps(tile + 72, c41);
  _mm256_storeu_ps(tile + 80, c50);
  _mm256_storeu_ps(tile + 88, c51);
}


AVX2_TARGET inline void Transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Decodes 8 weight rows (rows >= live are zero), 8 entries each from byte offset
// `offset` of every row, and writes them transposed: dst[k * stride + r] for k, r < 8
// (stride >= 6; entries r >= stride are junk the caller overwrites or never reads).
template <LutKind kind, bool kFull>
AVX2_TARGET inline void DecodeBlock8x8(const uint8_t* const* rows, const float* const* luts, int live,
                                       int64_t offset, uint64_t mask, float* dst, int64_t stride) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    if (kFull || i < live) {
      const float* lut = luts[i];
      const __m256 lo = _mm256_loadu_ps(lut);
      const __m256 hi = kind == LutKind::kPermute16 ? _mm256_loadu_ps(lut + 8) : lo;
      r[i] = Decode8<kind>(rows[i] + offset, mask, lo, hi, lut);
    } else {
      r[i] = _mm256_setzero_ps();
    }
  }
  Transpose8x8(r);
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * stride, r[k]);
}

// Panels of `width` (6 or 16) weight rows, [kc][width] each.  Writes up to
// 8 * width + 8 floats past the last panel (scratch buffers carry the slack).
template <LutKind kind>
AVX2_TARGET void PackWeightPanelsAvx2(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0,
                                      int64_t kc, int64_t width, float* dst) {
  const int64_t blocks = (kc + 7) / 8;
  const uint64_t mask = ByteLaneMask(w.bits);
  for (int64_t p = 0; p * width < n; ++p) {
    const int64_t live = std::min(width, n - p * width);
    float* panel = dst + p * width * kc;
    for (int64_t half = 0; half < width; half += 8) {
      const uint8_t* rows[8];
      const float* luts[8];
      const int live_half = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, live - half)));
      for (int i = 0; i < live_half; ++i) {
        const int64_t r = row0 + i0 + p * width + half + i;
        rows[i] = w.Row(r) + k0 / 8 * w.bits;
        luts[i] = w.Lut(r);
      }
      float* out = panel + half;
      if (live_half == 8) {
        for (int64_t b = 0; b < blocks; ++b)
          DecodeBlock8x8<kind, true>(rows, luts, 8, b * w.bits, mask, out + b * 8 * width, width);
      } else {
        for (int64_t b = 0; b < blocks; ++b)
          DecodeBlock8x8<kind, false>(rows, luts, live_half, b * w.bits, mask, out + b * 8 * width, width);
      }
    }
  }
}


// offsets[t]: where tap t of output (0, 0) reads in the phase planes.
AVX2_TARGET void DepthwiseRowsAvx2(const DepthwisePlan& d, const float* phases, const float* taps,
                                   const int64_t* offsets, float* y) {
  alignas(32) float tmp[8];
  const int64_t ntaps = d.kh * d.kw;
  for (int64_t oh = 0; oh < d.out_h; ++oh) {
    float* yrow = y + oh * d.out_w;
    const float* base = phases + oh * d.sh * d.phase_w;
    for (int64_t ow0 = 0; ow0 < d.out_w; ow0 += 8) {
      const float* b = base + ow0;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 1 < ntaps; t += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t), _mm256_loadu_ps(b + offsets[t]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t + 1), _mm256_loadu_ps(b + offsets[t + 1]), acc1);
      }
      if (t < ntaps) acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t), _mm256_loadu_ps(b + offsets[t]), acc0);
      const __m256 acc = _mm256_add_ps(acc0, acc1);
      const int64_t live = std::min<int64_t>(8, d.out_w - ow0);
      if (live == 8) {
        _mm256_storeu_ps(yrow + ow0, _mm256_add_ps(_mm256_loadu_ps(yrow + ow0), acc));
      } else {
        _mm256_store_ps(tmp, acc);
        for (int64_t i = 0; i < live; ++i) yrow[ow0 + i] += tmp[i];
      }
    }
  }
}

#endif  // ONNX_CODEBOOK_X86

void MicroKernel(int64_t kc, const float* a, const float* b, int64_t ldb, float* tile) {
#if ONNX_CODEBOOK_X86
  if (g_avx2) return MicroKernelAvx2(kc, a, b, ldb, tile, nullptr, 0, 0.f);
#endif
  MicroKernelPortable(kc, a, b, ldb, tile);
}

// Adds alpha * tile[mr][nr] into C at rows i0.., columns j0.. (with `first` and
// s.init_c, overwrites C with alpha * tile + row_bias instead).
void StoreTile(const GemmSpec& s, const float* tile, int64_t i0, int64_t mr, int64_t j0, int64_t nr, bool first) {
  const int64_t jq = j0 / s.col_div, jr = j0 % s.col_div;
  const bool contiguous = jr + nr <= s.col_div;
  const bool overwrite = first && s.init_c;
  for (int64_t i = 0; i < mr; ++i) {
    float* crow = s.c + (i0 + i) * s.row_stride;
    const float* t = tile + i * kNR;
    const float base = overwrite && s.row_bias ? s.row_bias[i0 + i] : 0.f;
    if (contiguous) {
      float* dst = crow + jq * s.col_outer + jr;
      for (int64_t j = 0; j < nr; ++j) dst[j] = (overwrite ? base : dst[j]) + s.alpha * t[j];
    } else {
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t col = j0 + j;
        float& dst = crow[(col / s.col_div) * s.col_outer + col % s.col_div];
        dst = (overwrite ? base : dst) + s.alpha * t[j];
      }
    }
  }
}

}  // namespace

bool UsesAvx2() { return g_avx2; }

void DecodeRow(const CodebookWeight& w, int64_t r, int64_t k0, int64_t count, float* out) {
#if ONNX_CODEBOOK_X86
  if (g_avx2) {
    switch (KindOf(w)) {
      case LutKind::kPermute8: return DecodeRowAvx2<LutKind::kPermute8>(w, r, k0, count, out);
      case LutKind::kPermute16: return DecodeRowAvx2<LutKind::kPermute16>(w, r, k0, count, out);
      case LutKind::kGather: return DecodeRowAvx2<LutKind::kGather>(w, r, k0, count, out);
    }
  }
#endif
  DecodeRowPortable(w, r, k0, count, out);
}

void PackWeightPanels(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0, int64_t kc,
                      int64_t width, float* dst) {
#if ONNX_CODEBOOK_X86
  if (g_avx2 && (width == 6 || width == 16)) {
    switch (KindOf(w)) {
      case LutKind::kPermute8: return PackWeightPanelsAvx2<LutKind::kPermute8>(w, row0, i0, n, k0, kc, width, dst);
      case LutKind::kPermute16: return PackWeightPanelsAvx2<LutKind::kPermute16>(w, row0, i0, n, k0, kc, width, dst);
      case LutKind::kGather: return PackWeightPanelsAvx2<LutKind::kGather>(w, row0, i0, n, k0, kc, width, dst);
    }
  }
#endif
  thread_local std::vector<float> rows_buf;
  const int64_t kc8 = (kc + 7) / 8 * 8;
  float* rows = Scratch(rows_buf, static_cast<size_t>(width * kc8));
  for (int64_t p = 0; p * width < n; ++p) {
    const int64_t live = std::min(width, n - p * width);
    for (int64_t r = 0; r < live; ++r) DecodeRow(w, row0 + i0 + p * width + r, k0, kc, rows + r * kc8);
    float* panel = dst + p * width * kc;
    for (int64_t k = 0; k < kc; ++k) {
      float* out = panel + k * width;
      for (int64_t r = 0; r < live; ++r) out[r] = rows[r * kc8 + k];
      for (int64_t r = live; r < width; ++r) out[r] = 0.f;
    }
  }
}

void RowsTimesWeight(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0, int64_t r1,
                     float alpha, float* y, int64_t ldy) {
#if ONNX_CODEBOOK_X86
  if (g_avx2) {
    switch (KindOf(w)) {
      case LutKind::kPermute8:
        return RowsTimesWeightDispatch<LutKind::kPermute8>(w, a, lda, rows_a, r0, r1, alpha, y, ldy);
      case LutKind::kPermute16:
        return RowsTimesWeightDispatch<LutKind::kPermute16>(w, a, lda, rows_a, r0, r1, alpha, y, ldy);
      case LutKind::kGather:
        return RowsTimesWeightDispatch<LutKind::kGather>(w, a, lda, rows_a, r0, r1, alpha, y, ldy);
    }
  }
#endif
  RowsTimesWeightPortable(w, a, lda, rows_a, r0, r1, alpha, y, ldy);
}

void ParallelFor(const OrtKernelContext* ctx, int64_t total, const std::function<void(int64_t)>& fn) {
  if (total <= 0) return;
  if (ctx == nullptr || total == 1) {
    for (int64_t i = 0; i < total; ++i) fn(i);
    return;
  }
  struct Job {
    const std::function<void(int64_t)>* fn;
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::exception_ptr error;
  } job;
  job.fn = &fn;
  auto trampoline = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    if (j->failed.load(std::memory_order_relaxed)) return;
    try {
      (*j->fn)(static_cast<int64_t>(i));
    } catch (...) {
      std::lock_guard<std::mutex> lock(j->mu);
      if (!j->failed.exchange(true)) j->error = std::current_exception();
    }
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, trampoline, static_cast<size_t>(total), 0, &job));
  if (job.error) std::rethrow_exception(job.error);
}

namespace {

// Task tiles: enough tasks for the intra-op pool, tiles small enough for the caches,
// and as little repeated packing as possible (every N tile repacks its A rows,
// every M tile its B columns).
void ChooseTiles(const GemmSpec& s, int64_t* bm_out, int64_t* bn_out) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(64, std::thread::hardware_concurrency()));
  const int64_t max_bm = std::max<int64_t>(kMR, s.block_m / kMR * kMR);
  const int64_t max_bn = std::max<int64_t>(kNR, s.block_n / kNR * kNR);
  const int64_t max_tm = (s.M + kMR - 1) / kMR, max_tn = (s.N + kNR - 1) / kNR;
  double best = -1.0;
  *bm_out = max_bm;
  *bn_out = max_bn;
  // Fewest tiles that respect the size caps, then a few more for the workers.
  const int64_t min_tm = (s.M + max_bm - 1) / max_bm, min_tn = (s.N + max_bn - 1) / max_bn;
  const int64_t extra = 4 * workers;
  for (int64_t tm = min_tm; tm <= std::min(max_tm, min_tm + extra); ++tm) {
    const int64_t bm = (((s.M + tm - 1) / tm) + kMR - 1) / kMR * kMR;
    if (bm > max_bm) continue;
    const int64_t tiles_m = (s.M + bm - 1) / bm;
    for (int64_t tn = min_tn; tn <= std::min(max_tn, min_tn + extra); ++tn) {
      const int64_t bn = (((s.N + tn - 1) / tn) + kNR - 1) / kNR * kNR;
      if (bn > max_bn) continue;
      const int64_t tiles_n = (s.N + bn - 1) / bn;
      const int64_t tasks = tiles_m * tiles_n;
      // cost per reduction index: MACs (~1/32 cycle) + packing (cycles per element)
      const double work = static_cast<double>(tiles_m * bm) * static_cast<double>(tiles_n * bn) / 32.0 +
                          s.pack_a_cost * static_cast<double>(s.M) * static_cast<double>(tiles_n) +
                          s.pack_b_cost * static_cast<double>(s.N) * static_cast<double>(tiles_m);
      const double rounds = static_cast<double>((tasks + workers - 1) / workers);
      const double time = work / static_cast<double>(tasks) * rounds;
      if (best < 0 || time < best) {
        best = time;
        *bm_out = bm;
        *bn_out = bn;
      }
    }
  }
}

}  // namespace

void RunGemm(const GemmSpec& s, const OrtKernelContext* ctx) {
  if (s.M <= 0 || s.N <= 0) return;
  int64_t bm = 0, bn = 0;
  ChooseTiles(s, &bm, &bn);
  const int64_t tiles_m = (s.M + bm - 1) / bm;
  const int64_t tiles_n = (s.N + bn - 1) / bn;
  ParallelFor(ctx, tiles_m * tiles_n, [&](int64_t t) {
    thread_local std::vector<float> a_buf, b_buf;
    const int64_t i0 = (t % tiles_m) * bm, j0 = (t / tiles_m) * bn;
    const int64_t mi = std::min(bm, s.M - i0), nj = std::min(bn, s.N - j0);
    const int64_t panels = (mi + kMR - 1) / kMR, strips = (nj + kNR - 1) / kNR;
    constexpr int64_t kSlack = 8 * kNR + 8;  // packers may write this far past the end
    float* a = Scratch(a_buf, static_cast<size_t>(panels * kMR * kKC + kSlack));
    float* b = Scratch(b_buf, static_cast<size_t>(strips * kNR * kKC + kSlack));
    alignas(32) float tile[kMR * kNR];
    for (int64_t k0 = 0; k0 < s.K; k0 += kKC) {
      const int64_t kc = std::min(kKC, s.K - k0);
      s.pack_a(i0, mi, k0, kc, a);
      s.pack_b(j0, nj, k0, kc, b);
      for (int64_t q = 0; q < strips; ++q) {
        const int64_t nr = std::min(kNR, nj - q * kNR);
        const int64_t jc = j0 + q * kNR;
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t mr = std::min(kMR, mi - p * kMR);
#if ONNX_CODEBOOK_X86
          if (g_avx2 && mr == kMR && nr == kNR && jc % s.col_div + kNR <= s.col_div) {
            float* c = s.c + (i0 + p * kMR) * s.row_stride + (jc / s.col_div) * s.col_outer + jc % s.col_div;
            const bool first = s.init_c && k0 == 0;
            MicroKernelAvx2(kc, a + p * kMR * kc, b + q * kNR * kc, kNR, nullptr, c, s.row_stride, s.alpha, first,
                            s.row_bias ? s.row_bias + i0 + p * kMR : nullptr);
            continue;
          }
#endif
          MicroKernel(kc, a + p * kMR * kc, b + q * kNR * kc, kNR, tile);
          StoreTile(s, tile, i0 + p * kMR, mr, jc, nr, k0 == 0);
        }
      }
    }
  });
}

DepthwisePlan PlanDepthwise(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, int64_t pad_top, int64_t pad_left, int64_t out_h,
                            int64_t out_w) {
  DepthwisePlan d{height, width, kh, kw, sh, sw, dh, dw, pad_top, pad_left, out_h, out_w, 0, 0, {}};
  d.padded_h = (out_h - 1) * sh + (kh - 1) * dh + 1;
  const int64_t out_w8 = (out_w + 7) / 8 * 8;
  d.phase_w = out_w8 + ((kw - 1) * dw) / sw + 1;
  d.offsets.resize(static_cast<size_t>(kh * kw));
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t c = j * dw;
      d.offsets[i * kw + j] = ((c % sw) * d.padded_h + i * dh) * d.phase_w + c / sw;
    }
  }
  return d;
}

void DepthwisePlane(const DepthwisePlan& d, const float* x, const float* taps, float* y) {
  // Zero-padded copy of the input plane, split into `sw` column phases so that
  // every tap reads a contiguous run: phase q, column t holds padded column q + t*sw.
  thread_local std::vector<float> phase_buf;
  float* phases = Scratch(phase_buf, static_cast<size_t>(d.sw * d.padded_h * d.phase_w));
  for (int64_t q = 0; q < d.sw; ++q) {
    for (int64_t r = 0; r < d.padded_h; ++r) {
      float* dst = phases + (q * d.padded_h + r) * d.phase_w;
      const int64_t ih = r - d.pad_top;
      if (ih < 0 || ih >= d.height) {
        std::fill_n(dst, d.phase_w, 0.f);
        continue;
      }
      // column t reads iw = t * sw + first; valid when 0 <= iw < width
      const int64_t first = q - d.pad_left;
      const int64_t lo = std::min(d.phase_w, first >= 0 ? 0 : (-first + d.sw - 1) / d.sw);
      const int64_t hi = std::max(lo, std::min(d.phase_w, d.width - first <= 0 ? 0 : (d.width - first + d.sw - 1) / d.sw));
      const float* src = x + ih * d.width + first;
      std::fill(dst, dst + lo, 0.f);
      if (d.sw == 1) {
        std::memcpy(dst + lo, src + lo, static_cast<size_t>(hi - lo) * sizeof(float));
      } else {
        for (int64_t t = lo; t < hi; ++t) dst[t] = src[t * d.sw];
      }
      std::fill(dst + hi, dst + d.phase_w, 0.f);
    }
  }
  const std::vector<int64_t>& offsets = d.offsets;
#if ONNX_CODEBOOK_X86
  if (g_avx2) return DepthwiseRowsAvx2(d, phases, taps, offsets.data(), y);
#endif
  for (int64_t oh = 0; oh < d.out_h; ++oh) {
    float* yrow = y + oh * d.out_w;
    const float* base = phases + oh * d.sh * d.phase_w;
    for (int64_t t = 0; t < d.kh * d.kw; ++t) {
      const float* src = base + offsets[t];
      const float tap = taps[t];
      for (int64_t ow = 0; ow < d.out_w; ++ow) yrow[ow] += tap * src[ow];
    }
  }
}

}  // namespace onnx_codebook
