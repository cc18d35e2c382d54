#include "kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "unpack.h"

#if defined(__x86_64__) || defined(_M_X64)
#define ONNX_CODEBOOK_X86 1
#include <immintrin.h>
#define AVX2_TARGET __attribute__((target("avx2,fma,bmi,bmi2")))
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma,bmi,bmi2,prfchw")))
#else
#define ONNX_CODEBOOK_X86 0
#endif

namespace onnx_codebook {

namespace {

bool EnvIs(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

bool DetectAvx2() {
  // ONNX_CODEBOOK_PORTABLE=1 forces the portable kernels (for testing them).
  if (EnvIs("ONNX_CODEBOOK_PORTABLE", "1")) return false;
#if ONNX_CODEBOOK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

const bool g_avx2 = DetectAvx2();

bool DetectAvx512() {
  // ONNX_CODEBOOK_NO_AVX512=1 keeps the AVX2 micro-kernel (for testing it).
  if (!g_avx2 || EnvIs("ONNX_CODEBOOK_NO_AVX512", "1")) return false;
#if ONNX_CODEBOOK_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

const bool g_avx512 = DetectAvx512();

// ONNX_CODEBOOK_NO_VBMI=1 keeps the PDEP index decoding (for testing it).
bool DetectVbmi() {
  if (!g_avx512 || EnvIs("ONNX_CODEBOOK_NO_VBMI", "1")) return false;
#if ONNX_CODEBOOK_X86
  return __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

const bool g_vbmi = DetectVbmi();

// ONNX_CODEBOOK_PIXEL_GEMM=0 keeps every convolution off the pixel-major GEMM, =1 sends
// every one it can take there (for testing both); read once, like the flags above.
const bool g_pixel_gemm = g_avx512 && !EnvIs("ONNX_CODEBOOK_PIXEL_GEMM", "0");
const bool g_force_pixel_gemm = g_pixel_gemm && EnvIs("ONNX_CODEBOOK_PIXEL_GEMM", "1");
// Winograd F(2x2, 3x3) convolutions: AVX-512 and not ONNX_CODEBOOK_WINOGRAD=0.
const bool g_winograd = g_avx512 && !EnvIs("ONNX_CODEBOOK_WINOGRAD", "0");
// The sparse-column GEMM: AVX-512 and not ONNX_CODEBOOK_SPARSE=0; =1 sends every
// convolution it can take there (for testing).
const bool g_sparse = g_avx512 && !EnvIs("ONNX_CODEBOOK_SPARSE", "0");
const bool g_force_sparse = g_sparse && EnvIs("ONNX_CODEBOOK_SPARSE", "1");

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
                             int64_t r1, float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
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
    for (int64_t m = 0; m < rows_a; ++m) y[m * ldy + r * ldr] = act.Apply(y[m * ldy + r * ldr] + alpha * acc[m]);
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

// ---- the epilogue's activation on a vector (Epilogue::Apply lane by lane)
//
// exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by its Taylor
// polynomial of degree 6 (relative error below 2e-7).  x is first clamped to
// [-87, 88], where 2^n stays a normal float; max(lo, x) / min(hi, x) keep a NaN x.

constexpr float kExpLo = -87.f, kExpHi = 88.f, kLog2e = 1.44269504f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = kLn2Hi + kLn2Lo
constexpr float kExpC[7] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720};

AVX2_TARGET inline __m256 ExpAvx2(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), x));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[6]);
  for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((noinline)) AVX2_TARGET __m256 ActivateAvx2(const Epilogue& a, __m256 v) {
  const __m256 one = _mm256_set1_ps(1.f);
  switch (a.kind) {
    case Activation::kNone: return v;
    case Activation::kClamp: return _mm256_min_ps(_mm256_set1_ps(a.hi), _mm256_max_ps(_mm256_set1_ps(a.lo), v));
    case Activation::kLeakyRelu: return _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(a.alpha)), v);
    case Activation::kSigmoid:
      return _mm256_div_ps(one, _mm256_add_ps(one, ExpAvx2(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    case Activation::kTanh: {  // 2 / (1 + exp(-2v)) - 1
      const __m256 e = ExpAvx2(_mm256_mul_ps(v, _mm256_set1_ps(-2.f)));
      return _mm256_sub_ps(_mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(one, e)), one);
    }
    case Activation::kHardSigmoid:
    case Activation::kHardSwish: {
      const __m256 y = _mm256_fmadd_ps(v, _mm256_set1_ps(a.alpha), _mm256_set1_ps(a.beta));
      const __m256 h = _mm256_min_ps(one, _mm256_max_ps(_mm256_setzero_ps(), y));
      return a.kind == Activation::kHardSwish ? _mm256_mul_ps(v, h) : h;
    }
    case Activation::kSilu:
      return _mm256_div_ps(v, _mm256_add_ps(one, ExpAvx2(_mm256_sub_ps(_mm256_setzero_ps(), v))));
  }
  return v;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside _mm512_min_ps / _mm512_max_ps
AVX512_TARGET inline __m512 ExpAvx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(_mm512_set1_ps(kExpLo), x));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[6]);
  for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[i]));
  return _mm512_scalef_ps(p, n);
}

__attribute__((noinline)) AVX512_TARGET __m512 ActivateAvx512(const Epilogue& a, __m512 v) {
  const __m512 one = _mm512_set1_ps(1.f);
  switch (a.kind) {
    case Activation::kNone: return v;
    case Activation::kClamp: return _mm512_min_ps(_mm512_set1_ps(a.hi), _mm512_max_ps(_mm512_set1_ps(a.lo), v));
    case Activation::kLeakyRelu:
      return _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v, _mm512_set1_ps(a.alpha));
    case Activation::kSigmoid:
      return _mm512_div_ps(one, _mm512_add_ps(one, ExpAvx512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    case Activation::kTanh: {  // 2 / (1 + exp(-2v)) - 1
      const __m512 e = ExpAvx512(_mm512_mul_ps(v, _mm512_set1_ps(-2.f)));
      return _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, e)), one);
    }
    case Activation::kHardSigmoid:
    case Activation::kHardSwish: {
      const __m512 y = _mm512_fmadd_ps(v, _mm512_set1_ps(a.alpha), _mm512_set1_ps(a.beta));
      const __m512 h = _mm512_min_ps(one, _mm512_max_ps(_mm512_setzero_ps(), y));
      return a.kind == Activation::kHardSwish ? _mm512_mul_ps(v, h) : h;
    }
    case Activation::kSilu:
      return _mm512_div_ps(v, _mm512_add_ps(one, ExpAvx512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
  }
  return v;
}
#pragma GCC diagnostic pop

// An epilogue's activation made once per loop (Relu / Clip bounds in registers).
struct Activate256 {
  const Epilogue* e;
  __m256 lo, hi;
  AVX2_TARGET explicit Activate256(const Epilogue& a)
      : e(&a), lo(_mm256_set1_ps(a.lo)), hi(_mm256_set1_ps(a.hi)) {}
  AVX2_TARGET __m256 operator()(__m256 v) const {
    if (e->kind == Activation::kNone) return v;
    if (e->kind == Activation::kClamp) return _mm256_min_ps(hi, _mm256_max_ps(lo, v));
    return ActivateAvx2(*e, v);
  }
};

struct Activate512 {
  const Epilogue* e;
  __m512 lo, hi;
  AVX512_TARGET explicit Activate512(const Epilogue& a)
      : e(&a), lo(_mm512_set1_ps(a.lo)), hi(_mm512_set1_ps(a.hi)) {}
  AVX512_TARGET __m512 operator()(__m512 v) const {
    if (e->kind == Activation::kNone) return v;
    if (e->kind == Activation::kClamp) return _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    return ActivateAvx512(*e, v);
  }
};

AVX2_TARGET void StoreActivatedAvx2(const Epilogue& act, const float* src, const float* add, float* dst, int64_t n) {
  const Activate256 activate(act);
  alignas(32) float tmp[8];
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t live = std::min<int64_t>(8, n - i);
    if (live == 8) {
      __m256 v = _mm256_loadu_ps(src + i);
      if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(add + i));
      _mm256_storeu_ps(dst + i, activate(v));
    } else {
      for (int64_t j = 0; j < 8; ++j) tmp[j] = j < live ? src[i + j] + (add ? add[i + j] : 0.f) : 0.f;
      _mm256_store_ps(tmp, activate(_mm256_load_ps(tmp)));
      for (int64_t j = 0; j < live; ++j) dst[i + j] = tmp[j];
    }
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside the masked loads
AVX512_TARGET void StoreActivatedAvx512(const Epilogue& act, const float* src, const float* add, float* dst,
                                        int64_t n) {
  const Activate512 activate(act);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add + i));
    _mm512_mask_storeu_ps(dst + i, m, activate(v));
  }
}
#pragma GCC diagnostic pop

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
                                     float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
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
      float& out = y[m * ldy + r * ldr];
      out = act.Apply(out + alpha * HorizontalSum(s));
    }
  }
}

template <LutKind kind>
void RowsTimesWeightDispatch(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0,
                             int64_t r1, float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
  switch (rows_a) {
    case 1: return RowsTimesWeightAvx2<kind, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 2: return RowsTimesWeightAvx2<kind, 2, 2>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 3: return RowsTimesWeightAvx2<kind, 3, 2>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 4: return RowsTimesWeightAvx2<kind, 4, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 5: return RowsTimesWeightAvx2<kind, 5, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 6: return RowsTimesWeightAvx2<kind, 6, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 7: return RowsTimesWeightAvx2<kind, 7, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    default: return RowsTimesWeightAvx2<kind, 8, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
  }
}

// Where and how a micro-tile of C is written (see MicroKernelAvx2).
struct TileStore {
  float* c = nullptr;            // C(0, 0) of the tile; null: write the raw product to `tile`
  int64_t ldc = 0;
  float alpha = 1.f;
  bool first = false;            // overwrite C with bias[i] (+ add) instead of accumulating
  const float* bias = nullptr;   // per row, may be null
  const float* add = nullptr;    // indexed like c, may be null (only with first)
  bool last = false;             // apply the epilogue
  const Epilogue* act = nullptr;
  // AVX-512 only: a partial or split tile.  Rows < mr and columns < nr are written;
  // columns >= split live `jump` floats further on (the next image's plane).
  int64_t mr = kMR, nr = kNR, split = kNR, jump = 0;
};

// Writes the 6x16 product to tile (row stride ldt), or when tile is null accumulates
// alpha times it into st.c (see TileStore; mr, nr and split are ignored).
AVX2_TARGET void MicroKernelAvx2(int64_t kc, const float* a, const float* b, int64_t ldb, float* tile,
                                 int64_t ldt, const TileStore& st) {
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
  if (tile == nullptr) {  // write into C
    const __m256 al = _mm256_set1_ps(st.alpha);
    const __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    // Relu / Clip as before the other activations existed: bounds in registers, a
    // select per vector (measured: constructing the activation per tile cost 1-2 %)
    const bool clamp = st.last && st.act->kind == Activation::kClamp;
    const bool other = st.last && st.act->Active() && !clamp;
    const __m256 lo = _mm256_set1_ps(st.act->lo), hi = _mm256_set1_ps(st.act->hi);
    for (int i = 0; i < 6; ++i) {
      float* row = st.c + i * st.ldc;
      __m256 c0, c1;
      if (st.first) {
        c0 = c1 = _mm256_set1_ps(st.bias ? st.bias[i] : 0.f);
        if (st.add) {
          const float* z = st.add + i * st.ldc;
          c0 = _mm256_add_ps(c0, _mm256_loadu_ps(z));
          c1 = _mm256_add_ps(c1, _mm256_loadu_ps(z + 8));
        }
      } else {
        c0 = _mm256_loadu_ps(row);
        c1 = _mm256_loadu_ps(row + 8);
      }
      __m256 v0 = _mm256_fmadd_ps(al, acc[2 * i], c0);
      __m256 v1 = _mm256_fmadd_ps(al, acc[2 * i + 1], c1);
      if (clamp) {
        v0 = _mm256_min_ps(hi, _mm256_max_ps(lo, v0));
        v1 = _mm256_min_ps(hi, _mm256_max_ps(lo, v1));
      } else if (other) {
        v0 = ActivateAvx2(*st.act, v0);
        v1 = ActivateAvx2(*st.act, v1);
      }
      _mm256_storeu_ps(row, v0);
      _mm256_storeu_ps(row + 8, v1);
    }
    return;
  }
  const __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  for (int i = 0; i < 6; ++i) {
    _mm256_storeu_ps(tile + i * ldt, acc[2 * i]);
    _mm256_storeu_ps(tile + i * ldt + 8, acc[2 * i + 1]);
  }
}

// The full kMR x kNR (6 x 32) tile as two 6 x 16 AVX2 kernels.
AVX2_TARGET void MicroKernelAvx2Full(int64_t kc, const float* a, const float* b, float* tile, const TileStore& st) {
  static_assert(kNR == 32, "two 16-wide halves");
  if (tile != nullptr) {
    MicroKernelAvx2(kc, a, b, kNR, tile, kNR, st);
    MicroKernelAvx2(kc, a, b + 16, kNR, tile + 16, kNR, st);
    return;
  }
  MicroKernelAvx2(kc, a, b, kNR, nullptr, 0, st);
  TileStore right = st;
  right.c += 16;
  if (right.add) right.add += 16;
  MicroKernelAvx2(kc, a, b + 16, kNR, nullptr, 0, right);
}

// GCC 12's _mm512_max_ps / _mm512_min_ps pass _mm512_undefined_ps() and warn about it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 floats: lanes in `near` from p, lanes in `far` from p + jump, others 0.
// Masks that are all zero skip the access (it would still cost a microcode assist
// on an unmapped address).
AVX512_TARGET inline __m512 SplitLoad(const float* p, int64_t jump, __mmask16 near, __mmask16 far) {
  const __m512 v = near ? _mm512_maskz_loadu_ps(near, p) : _mm512_setzero_ps();
  return far ? _mm512_mask_loadu_ps(v, far, p + jump) : v;
}

// kMR x kNR (6 x 32) tile with 12 zmm accumulators; same contract as MicroKernelAvx2.
// R = 6: one A panel; R = 12: two adjacent A panels, a and a + kMR * kc (rows 6..11),
// which halves the B loads and loop overhead per FMA.
// kDirect: row k of B is b + boff[k] (read in place, all kNR columns) instead of
// b + k * kNR.  kRowsA: A holds rows, row i at a + i * kKC (see PackWeightRows),
// instead of panels of [kc][kMR].
constexpr int64_t kPrefetchRows = 16;

template <int R, bool kDirect = false, bool kRowsA = false>
AVX512_TARGET void MicroKernelAvx512(int64_t kc, const float* a, const float* b, float* tile, const TileStore& st,
                                     const int64_t* boff = nullptr) {
  static_assert(kMR == 6 && kNR == 32 && (R == 6 || R == 12), "6 or 12 x 32 tile");
  if (tile == nullptr) {
    // The epilogue reads and writes C (and Z) rows far apart in memory.  Tiles walk
    // along their rows 32 columns at a time, so fetch the rows of the next tile's
    // columns now (this tile's were fetched by the previous one), for writing when
    // this pass overwrites C.
    for (int64_t i = 0; i < std::min<int64_t>(R, st.mr); ++i) {
      const char* row = reinterpret_cast<const char*>(st.c + i * st.ldc + kNR);
      if (st.first) {
        __builtin_prefetch(row, 1, 3);
        __builtin_prefetch(row + 64, 1, 3);
        __builtin_prefetch(row + 127, 1, 3);
      } else {
        _mm_prefetch(row, _MM_HINT_T0);
        _mm_prefetch(row + 64, _MM_HINT_T0);
        _mm_prefetch(row + 127, _MM_HINT_T0);
      }
      if (st.first && st.add) {
        const char* z = reinterpret_cast<const char*>(st.add + i * st.ldc + kNR);
        _mm_prefetch(z, _MM_HINT_T0);
        _mm_prefetch(z + 64, _MM_HINT_T0);
        _mm_prefetch(z + 127, _MM_HINT_T0);
      }
    }
  }
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const float* a1 = a + kMR * kc;
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = kDirect ? b + boff[k] : b + k * kNR;
    if constexpr (kDirect) {
      // B rows are scattered over the phase buffer: fetch the row kPrefetchRows steps ahead
      // (its 128 bytes span up to three cache lines).
      const float* ahead = b + boff[std::min(k + kPrefetchRows, kc - 1)];
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead) + 127, _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_loadu_ps(bk);
    const __m512 b1 = _mm512_loadu_ps(bk + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(kRowsA ? a[i * kKC + k] : i < 6 ? a[k * kMR + i] : a1[k * kMR + i - 6]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  if (tile != nullptr) {
    for (int i = 0; i < 6; ++i) {
      _mm512_storeu_ps(tile + i * kNR, acc[i][0]);
      _mm512_storeu_ps(tile + i * kNR + 16, acc[i][1]);
    }
    return;
  }
  const __m512 al = _mm512_set1_ps(st.alpha);
  const bool clamp = st.last && st.act->kind == Activation::kClamp;  // (as in the AVX2 kernel)
  const bool other = st.last && st.act->Active() && !clamp;
  const __m512 lo = _mm512_set1_ps(st.act->lo), hi = _mm512_set1_ps(st.act->hi);
  if (st.mr != R || st.nr != kNR || st.split != kNR) {
    // Columns [0, split) at c + j, [split, nr) at c + jump + j.
    const uint32_t live = st.nr >= 32 ? 0xFFFFFFFFu : (1u << st.nr) - 1u;
    const uint32_t near = live & (st.split >= 32 ? 0xFFFFFFFFu : (1u << st.split) - 1u), far = live & ~near;
    const __mmask16 n0 = static_cast<__mmask16>(near), n1 = static_cast<__mmask16>(near >> 16);
    const __mmask16 f0 = static_cast<__mmask16>(far), f1 = static_cast<__mmask16>(far >> 16);
    for (int64_t i = 0; i < st.mr; ++i) {
      float* row = st.c + i * st.ldc;
      __m512 c0, c1;
      if (st.first) {
        c0 = c1 = _mm512_set1_ps(st.bias ? st.bias[i] : 0.f);
        if (st.add) {
          const float* z = st.add + i * st.ldc;
          c0 = _mm512_add_ps(c0, SplitLoad(z, st.jump, n0, f0));
          c1 = _mm512_add_ps(c1, SplitLoad(z + 16, st.jump, n1, f1));
        }
      } else {
        c0 = SplitLoad(row, st.jump, n0, f0);
        c1 = SplitLoad(row + 16, st.jump, n1, f1);
      }
      __m512 v0 = _mm512_fmadd_ps(al, acc[i][0], c0);
      __m512 v1 = _mm512_fmadd_ps(al, acc[i][1], c1);
      if (clamp) {
        v0 = _mm512_min_ps(hi, _mm512_max_ps(lo, v0));
        v1 = _mm512_min_ps(hi, _mm512_max_ps(lo, v1));
      } else if (other) {
        v0 = ActivateAvx512(*st.act, v0);
        v1 = ActivateAvx512(*st.act, v1);
      }
      if (n0) _mm512_mask_storeu_ps(row, n0, v0);
      if (n1) _mm512_mask_storeu_ps(row + 16, n1, v1);
      if (f0) _mm512_mask_storeu_ps(row + st.jump, f0, v0);
      if (f1) _mm512_mask_storeu_ps(row + st.jump + 16, f1, v1);
    }
    return;
  }
  for (int i = 0; i < R; ++i) {
    float* row = st.c + i * st.ldc;
    __m512 c0, c1;
    if (st.first) {
      c0 = c1 = _mm512_set1_ps(st.bias ? st.bias[i] : 0.f);
      if (st.add) {
        const float* z = st.add + i * st.ldc;
        c0 = _mm512_add_ps(c0, _mm512_loadu_ps(z));
        c1 = _mm512_add_ps(c1, _mm512_loadu_ps(z + 16));
      }
    } else {
      c0 = _mm512_loadu_ps(row);
      c1 = _mm512_loadu_ps(row + 16);
    }
    __m512 v0 = _mm512_fmadd_ps(al, acc[i][0], c0);
    __m512 v1 = _mm512_fmadd_ps(al, acc[i][1], c1);
    if (clamp) {
      v0 = _mm512_min_ps(hi, _mm512_max_ps(lo, v0));
      v1 = _mm512_min_ps(hi, _mm512_max_ps(lo, v1));
    } else if (other) {
      v0 = ActivateAvx512(*st.act, v0);
      v1 = ActivateAvx512(*st.act, v1);
    }
    _mm512_storeu_ps(row, v0);
    _mm512_storeu_ps(row + 16, v1);
  }
}
#pragma GCC diagnostic pop


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
                                   const int64_t* offsets, float bias, const float* z, const Epilogue& act, float* y) {
  alignas(32) float tmp[8];
  const __m256 vb = _mm256_set1_ps(bias);
  const Activate256 activate(act);
  const int64_t ntaps = d.kh * d.kw;
  for (int64_t oh = 0; oh < d.out_h; ++oh) {
    float* yrow = y + oh * d.out_w;
    const float* zrow = z ? z + oh * d.out_w : nullptr;
    const float* base = phases + oh * d.sh * d.phase_w;
    for (int64_t ow0 = 0; ow0 < d.out_w; ow0 += 8) {
      const float* b = base + ow0;
      __m256 acc0 = vb, acc1 = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 1 < ntaps; t += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t), _mm256_loadu_ps(b + offsets[t]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t + 1), _mm256_loadu_ps(b + offsets[t + 1]), acc1);
      }
      if (t < ntaps) acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(taps + t), _mm256_loadu_ps(b + offsets[t]), acc0);
      __m256 acc = _mm256_add_ps(acc0, acc1);
      const int64_t live = std::min<int64_t>(8, d.out_w - ow0);
      if (live == 8) {
        if (zrow) acc = _mm256_add_ps(acc, _mm256_loadu_ps(zrow + ow0));
        acc = activate(acc);
        _mm256_storeu_ps(yrow + ow0, acc);
      } else {
        _mm256_store_ps(tmp, acc);
        for (int64_t i = 0; i < live; ++i) yrow[ow0 + i] = act.Apply(tmp[i] + (zrow ? zrow[ow0 + i] : 0.f));
      }
    }
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// R output rows from oh, 16 columns at a time (the tail masked): R independent
// accumulation chains share every tap broadcast.
template <int R>
AVX512_TARGET inline void DepthwiseRowBlockAvx512(const DepthwisePlan& d, const float* phases, const float* taps,
                                                  const int64_t* offsets, __m512 vb, const float* z,
                                                  const Epilogue& act, float* y, int64_t oh) {
  const Activate512 activate(act);
  const int64_t ntaps = d.kh * d.kw, row_step = d.sh * d.phase_w;
  const float* base = phases + oh * row_step;
  for (int64_t ow0 = 0; ow0 < d.out_w; ow0 += 16) {
    const float* b = base + ow0;
    // two chains per row (even / odd taps) halve the FMA latency chain
    __m512 acc[R], alt[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = vb;
      alt[r] = _mm512_setzero_ps();
    }
    int64_t t = 0;
    for (; t + 1 < ntaps; t += 2) {
      const __m512 tap0 = _mm512_set1_ps(taps[t]), tap1 = _mm512_set1_ps(taps[t + 1]);
      const float* src0 = b + offsets[t];
      const float* src1 = b + offsets[t + 1];
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(tap0, _mm512_loadu_ps(src0 + r * row_step), acc[r]);
        alt[r] = _mm512_fmadd_ps(tap1, _mm512_loadu_ps(src1 + r * row_step), alt[r]);
      }
    }
    if (t < ntaps) {
      const __m512 tap = _mm512_set1_ps(taps[t]);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(tap, _mm512_loadu_ps(b + offsets[t] + r * row_step), acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_add_ps(acc[r], alt[r]);
    const int64_t live = std::min<int64_t>(16, d.out_w - ow0);
    const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1u);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (oh + r) * d.out_w + ow0;
      __m512 v = acc[r];
      if (z) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, z + at));
      v = activate(v);
      _mm512_mask_storeu_ps(y + at, mask, v);
    }
  }
}

// DepthwiseRowsAvx2 with 16 lanes, four output rows at a time.
AVX512_TARGET void DepthwiseRowsAvx512(const DepthwisePlan& d, const float* phases, const float* taps,
                                       const int64_t* offsets, float bias, const float* z, const Epilogue& act,
                                       float* y) {
  const __m512 vb = _mm512_set1_ps(bias);
  int64_t oh = 0;
  for (; oh + 4 <= d.out_h; oh += 4) DepthwiseRowBlockAvx512<4>(d, phases, taps, offsets, vb, z, act, y, oh);
  switch (d.out_h - oh) {
    case 3: return DepthwiseRowBlockAvx512<3>(d, phases, taps, offsets, vb, z, act, y, oh);
    case 2: return DepthwiseRowBlockAvx512<2>(d, phases, taps, offsets, vb, z, act, y, oh);
    case 1: return DepthwiseRowBlockAvx512<1>(d, phases, taps, offsets, vb, z, act, y, oh);
    default: return;
  }
}

// dst[0, n) = 0 for the row of the phase planes.
AVX512_TARGET inline void ZeroRowAvx512(float* dst, int64_t n) {
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t m = std::min<int64_t>(16, n - t);
    _mm512_mask_storeu_ps(dst + t, static_cast<__mmask16>((1u << m) - 1u), _mm512_setzero_ps());
  }
}

// dst[t] = src[t] for t in [lo, hi), 0 elsewhere in [0, n).
AVX512_TARGET void CopyRowAvx512(float* dst, const float* src, int64_t lo, int64_t hi, int64_t n) {
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t m = std::min<int64_t>(16, n - t);
    // lanes i with lo <= t + i < hi read src
    const int64_t a = std::clamp<int64_t>(lo - t, 0, 16), b = std::clamp<int64_t>(hi - t, 0, 16);
    const uint32_t in = b > a ? ((b >= 16 ? 0xFFFFu : (1u << b) - 1u) & ~((1u << a) - 1u)) : 0u;
    const __m512 v = in ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(in), src + t) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(dst + t, static_cast<__mmask16>((1u << m) - 1u), v);
  }
}
#pragma GCC diagnostic pop

// dst[t] = src[2 * t] for t in [lo, hi), 16 at a time (the tail masked).
AVX512_TARGET void GatherStride2Avx512(float* dst, const float* src, int64_t lo, int64_t hi) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t t = lo; t < hi; t += 16) {
    const int64_t n = std::min<int64_t>(16, hi - t);
    const uint32_t need = n == 16 ? 0x7FFFFFFFu : (1u << (2 * n - 1)) - 1u;  // src[2t .. 2t + 2n - 2]
    const __m512 v0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(need), src + 2 * t);
    const __m512 v1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(need >> 16), src + 2 * t + 16);
    _mm512_mask_storeu_ps(dst + t, static_cast<__mmask16>((1u << n) - 1u), _mm512_permutex2var_ps(v0, even, v1));
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on AVX-512 intrinsics' pass-through operands
// AddStrided with AVX-512 for strides 1 and 2 (the lanes of dst in a stride-2 run
// that src does not reach are added zeros: the masks keep them in bounds).
AVX512_TARGET void AddStridedAvx512(float* dst, const float* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t u = 0; u < n; u += 16) {
      const __mmask16 m = static_cast<__mmask16>(n - u >= 16 ? 0xFFFFu : (1u << (n - u)) - 1u);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + u), _mm512_maskz_loadu_ps(m, src + u));
      _mm512_mask_storeu_ps(dst + u, m, sum);
    }
    return;
  }
  // src[u] to lane 2u of 32: the first 8 entries fill the even lanes of the low half
  const __m512i spread_lo = _mm512_setr_epi32(0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0);
  const __m512i spread_hi = _mm512_setr_epi32(8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15, 0);
  for (int64_t u = 0; u < n; u += 16) {
    const int64_t k = std::min<int64_t>(16, n - u);
    const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << k) - 1u), src + u);
    const uint32_t reach = (1u << (2 * k - 1)) - 1u;  // dst[2u .. 2u + 2k - 2]
    const __mmask16 m0 = static_cast<__mmask16>(reach & 0x5555u), m1 = static_cast<__mmask16>((reach >> 16) & 0x5555u);
    float* d = dst + 2 * u;
    _mm512_mask_storeu_ps(d, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d), _mm512_permutexvar_ps(spread_lo, v)));
    _mm512_mask_storeu_ps(d + 16, m1,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d + 16), _mm512_permutexvar_ps(spread_hi, v)));
  }
}
#pragma GCC diagnostic pop

// GatherColumns with AVX-512.
AVX512_TARGET void GatherColumnsAvx512(const float* src, int64_t reach, const int32_t* offsets, int64_t n,
                                       float* dst) {
  const __m512i at = _mm512_loadu_si512(offsets);
  const __mmask16 live = _mm512_cmpge_epi32_mask(at, _mm512_setzero_si512()) & static_cast<__mmask16>((1u << n) - 1u);
  // a source of at most 16 floats fits one register: a permute instead of a gather
  // (an AVX-512 gather measured about 16 cycles on this AMD host)
  const __m512 v = reach <= 16 ? _mm512_maskz_permutexvar_ps(
                                     live, at, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << reach) - 1u), src))
                               : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, at, src, 4);
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1u), v);
}

// GatherRows with AVX-512, for a source of at most 16 floats.
AVX512_TARGET void GatherRowsAvx512(const float* src, int64_t reach, const int32_t* offsets, int64_t span,
                                    int64_t taps, int64_t ld, float* dst) {
  const __mmask16 row = static_cast<__mmask16>((1u << ld) - 1u);
  const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << reach) - 1u), src);
  for (int64_t t = 0; t < taps; ++t) {
    const __m512i at = _mm512_loadu_si512(offsets + t * span);
    const __mmask16 live = _mm512_cmpge_epi32_mask(at, _mm512_setzero_si512()) & row;
    _mm512_mask_storeu_ps(dst + t * ld, row, _mm512_maskz_permutexvar_ps(live, at, v));
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// r[i][j] -> r[j][i] for a 16 x 16 block of floats in 16 registers.
AVX512_TARGET inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // r[4q + m] now holds, per 128-bit lane l, rows 4q..4q+3 of column 4l + m
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

// Q output positions (step floats apart in xin) of 16 channels: dst[q * 16 + c].
template <int Q>
AVX512_TARGET inline void DepthwisePositions(const float* taps, int64_t ntaps, const int64_t* tap_at,
                                             const float* base, int64_t step, __m512 vb, float* dst) {
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = vb;
  for (int64_t t = 0; t < ntaps; ++t) {
    const __m512 wt = _mm512_loadu_ps(taps + t * 16);
    const float* src = base + tap_at[t];
    for (int q = 0; q < Q; ++q) acc[q] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(src + q * step), acc[q]);
  }
  for (int q = 0; q < Q; ++q) _mm512_storeu_ps(dst + q * 16, acc[q]);
}

// Q consecutive output positions of a row of 16 channels, for kernels KW wide with
// column stride S and no column dilation: each input row of the window is loaded
// once into registers ((Q - 1) * S + KW vectors) and reused by every tap of that row,
// instead of one load per tap and position.  Row i of the window starts at
// base + i * row_step; taps[(i * KW + j) * 16 + c]; dst[q * 16 + c].
template <int Q, int KW, int S>
AVX512_TARGET void DepthwiseRow(const float* taps, int64_t kh, int64_t row_step, const float* base,
                                const float* bias16, float* dst) {
  constexpr int kIn = (Q - 1) * S + KW;
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_loadu_ps(bias16);
  for (int64_t i = 0; i < kh; ++i, base += row_step, taps += KW * 16) {
    __m512 in[kIn];
    for (int p = 0; p < kIn; ++p) in[p] = _mm512_loadu_ps(base + p * 16);
    for (int j = 0; j < KW; ++j) {
      const __m512 wt = _mm512_loadu_ps(taps + j * 16);
      for (int q = 0; q < Q; ++q) acc[q] = _mm512_fmadd_ps(wt, in[q * S + j], acc[q]);
    }
  }
  for (int q = 0; q < Q; ++q) _mm512_storeu_ps(dst + q * 16, acc[q]);
}

using DepthwiseRowFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, float*);

template <int KW, int S, int... Q>
constexpr std::array<DepthwiseRowFn, sizeof...(Q)> DepthwiseRowTable(std::integer_sequence<int, Q...>) {
  return {&DepthwiseRow<Q + 1, KW, S>...};
}

// Row kernels for Q = 1..kRowPositions, or null where there is none (kernel width
// other than 3, 5, 7; column stride other than 1, 2; column dilation).
constexpr int kRowPositions = 8;
const DepthwiseRowFn* DepthwiseRowKernels(int64_t kw, int64_t sw, int64_t dw) {
  using Qs = std::make_integer_sequence<int, kRowPositions>;
  static const auto k3s1 = DepthwiseRowTable<3, 1>(Qs{}), k5s1 = DepthwiseRowTable<5, 1>(Qs{}),
                    k7s1 = DepthwiseRowTable<7, 1>(Qs{}), k3s2 = DepthwiseRowTable<3, 2>(Qs{}),
                    k5s2 = DepthwiseRowTable<5, 2>(Qs{}), k7s2 = DepthwiseRowTable<7, 2>(Qs{});
  if (dw != 1 || (sw != 1 && sw != 2)) return nullptr;
  switch (kw) {
    case 3: return (sw == 1 ? k3s1 : k3s2).data();
    case 5: return (sw == 1 ? k5s1 : k5s2).data();
    case 7: return (sw == 1 ? k7s1 : k7s2).data();
    default: return nullptr;
  }
}

AVX512_TARGET void DepthwiseChannelsAvx512(const DepthwisePlan& d, int64_t count, const float* x, int64_t in_plane,
                                           const float* taps, const float* bias, const float* z,
                                           const Epilogue& act, float* y, int64_t out_plane) {
  // Zero-padded, channels-last copy of the block: xin[(r * pw + col) * 16 + c]; the
  // results go channels-last to out[p * 16 + c] and are written back plane by plane
  // (scalar transposes: AVX-512 gathers and scatters are slow here).
  const int64_t ph = d.padded_h, pw = (d.out_w - 1) * d.sw + (d.kw - 1) * d.dw + 1;
  thread_local std::vector<float> buf, out_buf;
  float* xin = Scratch(buf, static_cast<size_t>(ph * pw * 16));
  float* out = Scratch(out_buf, static_cast<size_t>(out_plane * 16));
  const int64_t r0 = std::max<int64_t>(0, d.pad_top), r1 = std::min(ph, d.height + d.pad_top);
  const int64_t c0 = std::max<int64_t>(0, d.pad_left), c1 = std::min(pw, d.width + d.pad_left);
  // Only the padding is zeroed (the input fills rows [r0, r1) x columns [c0, c1)),
  // and only when the previous call on this thread left another layout in the buffer.
  const __m512 zero = _mm512_setzero_ps();
  thread_local std::array<int64_t, 7> zeroed{};
  const std::array<int64_t, 7> layout{reinterpret_cast<int64_t>(xin), ph, pw, r0, r1, c0, c1};
  const bool stale = zeroed != layout;
  zeroed = layout;
  for (int64_t r = 0; r < ph && stale; ++r) {
    float* row = xin + r * pw * 16;
    const bool inside = r >= r0 && r < r1;
    for (int64_t col = 0; col < pw; ++col) {
      if (inside && col == c0) col = std::max(c0, c1);
      if (col < pw) _mm512_storeu_ps(row + col * 16, zero);
    }
  }
  // 16 input pixels of the 16 channel planes at a time (flat over the plane, so a
  // 7-pixel row does not cost a whole transpose), transposed to channels-last.
  __m512 v[16];
  int64_t ih = 0, iw = 0;
  for (int64_t p = 0; p < in_plane; p += 16) {
    const int64_t n = std::min<int64_t>(16, in_plane - p);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    // masked loads do not fault, so the lanes of channels past count read nothing
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) v[c] = _mm512_maskz_loadu_ps(c < count ? m : 0, x + c * in_plane + p);
    Transpose16x16(v);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= n) break;
      const int64_t r = ih + d.pad_top, col = iw + d.pad_left;
      if (r < r1 && col < c1) _mm512_storeu_ps(xin + (r * pw + col) * 16, v[j]);
      if (++iw == d.width) {
        iw = 0;
        ++ih;
      }
    }
  }
  const __mmask16 live = static_cast<__mmask16>(count >= 16 ? 0xFFFFu : (1u << count) - 1u);
  const __m512 vb = bias ? _mm512_maskz_loadu_ps(live, bias) : _mm512_setzero_ps();
  alignas(64) float bias16[16];
  _mm512_store_ps(bias16, vb);
  if (const DepthwiseRowFn* rows = DepthwiseRowKernels(d.kw, d.sw, d.dw)) {
    for (int64_t oh = 0; oh < d.out_h; ++oh) {
      for (int64_t ow = 0; ow < d.out_w; ow += kRowPositions) {
        const int64_t q = std::min<int64_t>(kRowPositions, d.out_w - ow);
        rows[q - 1](taps, d.kh, d.dh * pw * 16, xin + (oh * d.sh * pw + ow * d.sw) * 16, bias16,
                    out + (oh * d.out_w + ow) * 16);
      }
    }
  } else {
    // Up to four output positions of a row at a time: independent accumulation chains
    // that share each tap's weights; per tap its offset in xin from the window's corner.
    const int64_t ntaps = d.kh * d.kw;
    thread_local std::vector<int64_t> tap_at;
    tap_at.resize(static_cast<size_t>(ntaps));
    for (int64_t i = 0; i < d.kh; ++i)
      for (int64_t j = 0; j < d.kw; ++j) tap_at[i * d.kw + j] = (i * d.dh * pw + j * d.dw) * 16;
    const int64_t step = d.sw * 16;
    for (int64_t oh = 0; oh < d.out_h; ++oh) {
      for (int64_t ow = 0; ow < d.out_w; ow += 4) {
        const float* base = xin + (oh * d.sh * pw + ow * d.sw) * 16;
        float* dst = out + (oh * d.out_w + ow) * 16;
        switch (std::min<int64_t>(4, d.out_w - ow)) {
          case 4: DepthwisePositions<4>(taps, ntaps, tap_at.data(), base, step, vb, dst); break;
          case 3: DepthwisePositions<3>(taps, ntaps, tap_at.data(), base, step, vb, dst); break;
          case 2: DepthwisePositions<2>(taps, ntaps, tap_at.data(), base, step, vb, dst); break;
          default: DepthwisePositions<1>(taps, ntaps, tap_at.data(), base, step, vb, dst); break;
        }
      }
    }
  }
  const Activate512 activate(act);
  for (int64_t p = 0; p < out_plane; p += 16) {
    // 16 positions of 16 channels, transposed back to planes
    const int64_t n = std::min<int64_t>(16, out_plane - p);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) v[j] = _mm512_maskz_loadu_ps(j < n ? 0xFFFF : 0, out + (p + j) * 16);
    Transpose16x16(v);
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      const __mmask16 mc = c < count ? m : 0;
      __m512 o = v[c];
      if (z) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mc, z + c * out_plane + p));
      o = activate(o);
      _mm512_mask_storeu_ps(y + c * out_plane + p, mc, o);
    }
  }
}
#pragma GCC diagnostic pop


// ------------------------------------------ AVX-512 decoding, indices of <= 4 bits

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on AVX-512 intrinsics' pass-through operands
#pragma GCC diagnostic ignored "-Wuninitialized"

// Decoding 16 indices of at most 4 bits with one permute of the row's codebook
// register.  Without VBMI the indices are spread to bytes with two PDEPs; with VBMI
// one multishift (inline assembly, so that the rest of the AVX-512 code does not
// require VBMI) moves index i to the low bits of lane i, and the stray higher bits
// of the lane select a copy of the same entry: the register repeats its first
// 2^bits entries.
struct Decode16Params {
  int64_t bits;
  uint64_t lane_mask;  // PDEP mask
  __m512i control;     // multishift selectors: byte 4i (lane i's low byte) = i * bits
};

// Multishift selectors per bit width (1..4): byte 4i = i * bits.
struct alignas(64) MultishiftControl {
  uint8_t bytes[64];
};
constexpr MultishiftControl MakeMultishiftControl(int bits) {
  MultishiftControl c{};
  for (int i = 0; i < 16; ++i) c.bytes[4 * i] = static_cast<uint8_t>(i * bits);
  return c;
}
constexpr MultishiftControl kMultishiftControl[5] = {MakeMultishiftControl(0), MakeMultishiftControl(1),
                                                     MakeMultishiftControl(2), MakeMultishiftControl(3),
                                                     MakeMultishiftControl(4)};

AVX512_TARGET inline Decode16Params MakeDecode16Params(int64_t bits) {
  return {bits, ByteLaneMask(static_cast<int>(bits)), _mm512_load_si512(kMultishiftControl[bits].bytes)};
}

// The row's codebook in one register (entries past lut_stride are zero, not read).
template <bool kVbmi>
AVX512_TARGET inline __m512 Lut16(const CodebookWeight& w, int64_t r) {
  const __m512 lut = _mm512_maskz_loadu_ps(
      static_cast<__mmask16>(w.lut_stride >= 16 ? 0xFFFFu : (1u << w.lut_stride) - 1u), w.Lut(r));
  if (!kVbmi || w.bits >= 4) return lut;
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return _mm512_permutexvar_ps(_mm512_and_si512(lanes, _mm512_set1_epi32((1 << w.bits) - 1)), lut);
}

// Sixteen decoded weights from the 16 indices in the 2 * bits bytes at p.  Reads 8
// bytes (the index buffer ends with 8 spare bytes); every spread index is < 16, so
// it selects a lane of the codebook register.
template <bool kVbmi>
AVX512_TARGET inline __m512 Decode16(const uint8_t* p, const Decode16Params& d, __m512 lut) {
  if constexpr (kVbmi) {
    __m512i spread;
    __asm__("vpmultishiftqb %1%{1to8%}, %2, %0"
            : "=v"(spread)
            : "m"(*reinterpret_cast<const uint64_t*>(p)), "v"(d.control));
    return _mm512_permutexvar_ps(spread, lut);
  } else {
    uint64_t a, b;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + d.bits, 8);
    const __m128i bytes = _mm_set_epi64x(static_cast<long long>(_pdep_u64(b, d.lane_mask)),
                                         static_cast<long long>(_pdep_u64(a, d.lane_mask)));
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(bytes), lut);
  }
}

// Rows [r0, r0 + n), entries [k0, k0 + count): row r - r0 at out + (r - r0) * ld.
template <bool kVbmi>
AVX512_TARGET void DecodeRowsAvx512(const CodebookWeight& w, int64_t r0, int64_t n, int64_t k0, int64_t count,
                                    float* out, int64_t ld) {
  const Decode16Params d = MakeDecode16Params(w.bits);
  const int64_t step = 2 * w.bits;
  for (int64_t r = r0; r < r0 + n; ++r, out += ld) {
    const uint8_t* row = w.Row(r) + k0 / 8 * w.bits;
    const __m512 lut = Lut16<kVbmi>(w, r);
    int64_t c = 0;
    for (; c + 16 <= count; c += 16, row += step) _mm512_storeu_ps(out + c, Decode16<kVbmi>(row, d, lut));
    // out has room for count rounded up to 8
    if (c < count) _mm512_mask_storeu_ps(out + c, count - c > 8 ? 0xFFFF : 0x00FF, Decode16<kVbmi>(row, d, lut));
  }
}

// PackWeightPanels for a width that is a multiple of 16: rows decoded 16 at a time
// and transposed in registers into [k][width] (nothing written past row kc).
template <bool kVbmi>
AVX512_TARGET void PackWeightPanelsAvx512(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0,
                                          int64_t kc, int64_t width, float* dst) {
  const Decode16Params d = MakeDecode16Params(w.bits);
  __m512 v[16], lut[16];
  const uint8_t* rows[16];
  for (int64_t p = 0; p * width < n; ++p) {
    const int64_t live = std::min(width, n - p * width);
    float* panel = dst + p * width * kc;
    for (int64_t half = 0; half < width; half += 16) {
      const int64_t here = std::clamp<int64_t>(live - half, 0, 16);
      if (here == 0) {
        for (int64_t k = 0; k < kc; ++k) _mm512_storeu_ps(panel + k * width + half, _mm512_setzero_ps());
        continue;
      }
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = row0 + i0 + p * width + half + std::min(i, here - 1);
        rows[i] = w.Row(r) + k0 / 8 * w.bits;
        lut[i] = i < here ? Lut16<kVbmi>(w, r) : _mm512_setzero_ps();  // rows past n decode to 0
      }
      for (int64_t kb = 0; kb < kc; kb += 16) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) v[i] = Decode16<kVbmi>(rows[i] + kb / 8 * w.bits, d, lut[i]);
        Transpose16x16(v);  // v[j]: the 16 rows at k = kb + j
        const int64_t ks = std::min<int64_t>(16, kc - kb);
        float* out = panel + kb * width + half;
        // constant indices keep v in registers
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          if (j < ks) _mm512_storeu_ps(out + j * width, v[j]);
        }
      }
    }
  }
}

// RW rows of the weight, starting at r, against M activation rows, 16 weights per
// step, U accumulators per (weight row, activation row); adds the sums to
// y[m * ldy + (r + q) * ldr].  Several weight rows at once reuse each activation load
// (8 x 4096 activations against 4096 rows: 5.5 -> 3.4 ms).  The loops are unrolled
// by pragma: left to the compiler, the accumulators went through the stack on every
// step.
template <bool kVbmi, int M, int U, int RW>
AVX512_TARGET inline void WeightRowsTimesRows(const CodebookWeight& w, const Decode16Params& d, const float* a,
                                              int64_t lda, int64_t r, float alpha, float* y, int64_t ldy, int64_t ldr,
                                              const Epilogue& act) {
  static_assert(RW == 1 || U == 1, "several weight rows with one accumulator each");
  const int64_t full = w.cols_padded / 16;                 // chunks of 16 weights
  const int64_t chunks = full + w.cols_padded % 16 / 8;    // and a last one of 8
  const uint8_t* row[RW];
  __m512 lut[RW];
#pragma GCC unroll 8
  for (int q = 0; q < RW; ++q) {
    row[q] = w.Row(r + q);
    lut[q] = Lut16<kVbmi>(w, r + q);
  }
  __m512 acc[RW][M][U];
#pragma GCC unroll 8
  for (int q = 0; q < RW; ++q)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[q][m][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + U <= full; c += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      __m512 wv[RW];
#pragma GCC unroll 8
      for (int q = 0; q < RW; ++q) wv[q] = Decode16<kVbmi>(row[q] + (c + u) * 2 * w.bits, d, lut[q]);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 av = _mm512_loadu_ps(a + m * lda + (c + u) * 16);
#pragma GCC unroll 8
        for (int q = 0; q < RW; ++q) acc[q][m][u] = _mm512_fmadd_ps(av, wv[q], acc[q][m][u]);
      }
    }
  }
  for (; c < chunks; ++c) {  // the rest, and a last chunk of 8
    const __mmask16 live = c < full ? 0xFFFF : 0x00FF;
    __m512 wv[RW];
#pragma GCC unroll 8
    for (int q = 0; q < RW; ++q) wv[q] = Decode16<kVbmi>(row[q] + c * 2 * w.bits, d, lut[q]);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 av = _mm512_maskz_loadu_ps(live, a + m * lda + c * 16);
#pragma GCC unroll 8
      for (int q = 0; q < RW; ++q) acc[q][m][0] = _mm512_fmadd_ps(av, wv[q], acc[q][m][0]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < RW; ++q) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[q][m][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[q][m][u]);
      float& out = y[m * ldy + (r + q) * ldr];
      out = act.Apply(out + alpha * _mm512_reduce_add_ps(sum));
    }
  }
}

template <bool kVbmi, int M, int U, int RW>
AVX512_TARGET void RowsTimesWeightAvx512(const CodebookWeight& w, const float* a, int64_t lda, int64_t r0, int64_t r1,
                                         float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
  const Decode16Params d = MakeDecode16Params(w.bits);
  int64_t r = r0;
  for (; r + RW <= r1; r += RW) WeightRowsTimesRows<kVbmi, M, U, RW>(w, d, a, lda, r, alpha, y, ldy, ldr, act);
  for (; r < r1; ++r) WeightRowsTimesRows<kVbmi, M, U, 1>(w, d, a, lda, r, alpha, y, ldy, ldr, act);
}

template <bool kVbmi>
void RowsTimesWeightAvx512Dispatch(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0,
                                   int64_t r1, float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
  switch (rows_a) {
    case 1: return RowsTimesWeightAvx512<kVbmi, 1, 4, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 2: return RowsTimesWeightAvx512<kVbmi, 2, 2, 1>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 3: return RowsTimesWeightAvx512<kVbmi, 3, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 4: return RowsTimesWeightAvx512<kVbmi, 4, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    case 5: return RowsTimesWeightAvx512<kVbmi, 5, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
    default:
      // in passes of 4 activation rows, each decoding the weight again: 8 rows of 1024
      // (33 KB) against 256 weight rows took 0.083 ms in one pass, 0.058 in two
      RowsTimesWeightAvx512<kVbmi, 4, 1, 4>(w, a, lda, r0, r1, alpha, y, ldy, ldr, act);
      return RowsTimesWeightAvx512Dispatch<kVbmi>(w, a + 4 * lda, lda, rows_a - 4, r0, r1, alpha, y + 4 * ldy, ldy,
                                                  ldr, act);
  }
}
#pragma GCC diagnostic pop

// ------------------------------------------------------- pixel-major GEMM (AVX-512)

// R output pixels x 32 output channels: out[i * ostep + j] (+)= sum_k b[boff[k] + i * bstep]
// * panel[(k - k0) * 32 + j], over k in [k0, k0 + kc), or over the kc entries of ks with
// kList.  The pixels are broadcast and the channels are the vector lanes, so a plane of
// 49 pixels costs 49 columns, not 64.  Each block of k is summed on its own and then
// added (shorter rounding chains than one running sum over the whole reduction).
struct PixelArgs {
  int64_t kc, k0;
  const int32_t* ks;
  const float* b;
  int64_t bstep;
  const int64_t* boff;
  const float* panel;
  float* out;
  int64_t ostep;
  bool accumulate;
};

template <int R, bool kList, bool kStrided>
AVX512_TARGET void PixelKernel(const PixelArgs& a) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t step = kStrided ? a.bstep : 1, last = a.kc - 1;
  for (int64_t j = 0; j < a.kc; ++j) {
    const int64_t k = kList ? a.ks[j] : a.k0 + j;
    const float* bk = a.b + a.boff[k];
    const int64_t ahead = kList ? a.ks[std::min(j + kPrefetchRows, last)] : a.k0 + std::min(j + kPrefetchRows, last);
    _mm_prefetch(reinterpret_cast<const char*>(a.b + a.boff[ahead]), _MM_HINT_T0);
    const float* wk = a.panel + (k - a.k0) * 32;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(bk[i * step]);
      acc[i][0] = _mm512_fmadd_ps(ai, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float* o = a.out + i * a.ostep;
    if (a.accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(o));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(o + 16));
    }
    _mm512_storeu_ps(o, acc[i][0]);
    _mm512_storeu_ps(o + 16, acc[i][1]);
  }
}

template <bool kList, bool kStrided, int... R>
AVX512_TARGET void PixelKernelDispatch(int64_t r, const PixelArgs& a, std::integer_sequence<int, R...>) {
  using Fn = void (*)(const PixelArgs&);
  static constexpr Fn kernels[] = {&PixelKernel<R + 1, kList, kStrided>...};
  if (r < 1 || r > static_cast<int64_t>(sizeof...(R))) {
    throw std::logic_error("PixelKernel: tile of " + std::to_string(r) + " pixels");
  }
  kernels[r - 1](a);
}

AVX512_TARGET void RunPixelKernel(int64_t r, const PixelArgs& a) {
  constexpr auto tiles = std::make_integer_sequence<int, 12>{};
  const bool strided = a.bstep != 1;
  if (a.ks) {
    return strided ? PixelKernelDispatch<true, true>(r, a, tiles) : PixelKernelDispatch<true, false>(r, a, tiles);
  }
  return strided ? PixelKernelDispatch<false, true>(r, a, tiles) : PixelKernelDispatch<false, false>(r, a, tiles);
}

// ------------------------------------------------------- lane GEMM (AVX-512)

// Decoding that runs inside the lane kernel's loop, one 16-weight chunk per step
// (the permutes use a port the FMAs leave free): rows [0, rows) of the next weight
// block, `chunks` chunks each, into dst (row r at dst + r * kKC).  rows = 0: none
// (then nothing of VBMI runs).
struct LaneDecodeJob {
  __m512 lut[16];
  const uint8_t* row[16];
  float* dst = nullptr;
  int64_t rows = 0, chunks = 0;
};

// R output channels x 16 columns (the vector lanes): out[i * 16 + j] (+)= sum_k
// rows[i * kKC + k] * b[k * 16 + j], running `job` (VBMI decoding) alongside.  The
// weights are decoded as rows and broadcast one at a time, so nothing is transposed.
template <int R>
AVX512_TARGET void LaneKernel(int64_t kc, const float* b, const float* rows, float* out, bool accumulate,
                              const LaneDecodeJob& job, const Decode16Params& d) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) acc[i] = accumulate ? _mm512_loadu_ps(out + i * 16) : _mm512_setzero_ps();
  const int64_t step = 2 * d.bits;
  int64_t r = 0, j = 0;  // the next chunk to decode
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 bk = _mm512_loadu_ps(b + k * 16);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(rows[i * kKC + k]), bk, acc[i]);
    if (r < job.rows) {
      _mm512_storeu_ps(job.dst + r * kKC + j * 16, Decode16<true>(job.row[r] + j * step, d, job.lut[r]));
      if (++j == job.chunks) {
        j = 0;
        ++r;
      }
    }
  }
  for (; r < job.rows; ++r, j = 0) {  // chunks left when kc is short
    for (; j < job.chunks; ++j) {
      _mm512_storeu_ps(job.dst + r * kKC + j * 16, Decode16<true>(job.row[r] + j * step, d, job.lut[r]));
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(out + i * 16, acc[i]);
}

template <int... R>
AVX512_TARGET void LaneKernelDispatch(int64_t r, int64_t kc, const float* b, const float* rows, float* out,
                                      bool accumulate, const LaneDecodeJob& job, const Decode16Params& d,
                                      std::integer_sequence<int, R...>) {
  using Fn = void (*)(int64_t, const float*, const float*, float*, bool, const LaneDecodeJob&, const Decode16Params&);
  static constexpr Fn kernels[] = {&LaneKernel<R + 1>...};
  kernels[r - 1](kc, b, rows, out, accumulate, job, d);
}

// One lane-GEMM task: weight rows [row0, row0 + rows) against B at b, sums into acc.
// With VBMI and indices of at most 4 bits each next reduction block is decoded (into
// the other buffer) while the current one is multiplied; else each block is decoded
// before it.
AVX512_TARGET void LaneTask(const PixelGemmSpec& s, const float* b, int64_t row0, int64_t rows, float* buf0,
                            float* buf1, float* acc) {
  const CodebookWeight& w = *s.w;
  const bool overlap = g_vbmi && w.bits <= 4;
  const Decode16Params d = overlap ? MakeDecode16Params(w.bits) : Decode16Params{};
  float* buf[2] = {buf0, buf1};
  LaneDecodeJob job;
  for (int64_t k0 = 0, cur = 0; k0 < s.K; k0 += kKC, cur ^= overlap) {
    const int64_t kc = std::min(kKC, s.K - k0), next = k0 + kKC;
    if (!overlap || k0 == 0) PackWeightRows(w, row0, 0, rows, k0, kc, buf[cur]);
    job.rows = overlap && next < s.K ? rows : 0;
    if (job.rows) {
      job.chunks = (std::min(kKC, s.K - next) + 15) / 16;
      job.dst = buf[cur ^ 1];
      for (int64_t q = 0; q < rows; ++q) {
        job.row[q] = w.Row(row0 + q) + next / 8 * w.bits;
        job.lut[q] = Lut16<true>(w, row0 + q);
      }
    }
    LaneKernelDispatch(rows, kc, b + k0 * 16, buf[cur], acc, k0 > 0, job, d,
                       std::make_integer_sequence<int, static_cast<int>(kLaneRows)>{});
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// C(row0 + i, col) = act(acc[i * 16 + col] + bias + add) for i < rows, col < columns:
// column col of C is lane col; the lanes of one image are packed down and stored.
AVX512_TARGET void StoreLaneRows(const PixelGemmSpec& s, const float* acc, int64_t row0, int64_t rows,
                                 int64_t columns) {
  const Activate512 activate(s.act);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i;
    __m512 v = _mm512_loadu_ps(acc + i * 16);
    if (s.bias) v = _mm512_add_ps(v, _mm512_set1_ps(s.bias[row]));
    for (int64_t col = 0; col < columns;) {
      const int64_t within = col % s.col_div, n = std::min(columns - col, s.col_div - within);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
      const int64_t at = row * s.row_stride + (col / s.col_div) * s.col_outer + within;
      __m512 o = _mm512_maskz_compress_ps(static_cast<__mmask16>(mask << col), v);
      if (s.add) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask, s.add + at));
      o = activate(o);
      _mm512_mask_storeu_ps(s.c + at, mask, o);
      col += n;
    }
  }
}

// C(i0 + j, col) = act(acc[(col - col0) * 32 + j] + bias + add) for j < rows and col in
// [col0, col1): 16 columns of one image by 16 channels at a time, transposed in registers.
AVX512_TARGET void StorePixelBlock(const PixelGemmSpec& s, const float* acc, int64_t i0, int64_t rows, int64_t col0,
                                   int64_t col1) {
  const Activate512 activate(s.act);
  __m512 v[16];
  for (int64_t col = col0; col < col1;) {
    const int64_t within = col % s.col_div;
    const int64_t n = std::min<int64_t>({16, col1 - col, s.col_div - within});
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    const int64_t at = (col / s.col_div) * s.col_outer + within;
    const float* src = acc + (col - col0) * 32;
    for (int64_t half = 0; half < rows; half += 16) {
      for (int64_t i = 0; i < 16; ++i) v[i] = i < n ? _mm512_loadu_ps(src + i * 32 + half) : _mm512_setzero_ps();
      Transpose16x16(v);  // v[j]: the n columns of channel i0 + half + j
      for (int64_t j = 0; j < std::min<int64_t>(16, rows - half); ++j) {
        __m512 o = v[j];
        if (s.bias) o = _mm512_add_ps(o, _mm512_set1_ps(s.bias[i0 + half + j]));
        const int64_t out = (i0 + half + j) * s.row_stride + at;
        if (s.add) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask, s.add + out));
        o = activate(o);
        _mm512_mask_storeu_ps(s.c + out, mask, o);
      }
    }
    col += n;
  }
}

// ------------------------------------------------- sparse-column GEMM (AVX-512)

// The floats of x[0, n) that are not zero, 16 at a time; *done: how many were counted.
AVX512_TARGET int64_t CountNonzerosAvx512(const float* x, int64_t n, int64_t* done) {
  int64_t count = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_setzero_ps(), _CMP_NEQ_UQ));
  }
  *done = i;
  return count;
}

// Blocks of 16 rows of B: transposed in registers, each column's nonzero entries
// compressed onto the end of its list.
AVX512_TARGET void ListNonzerosAvx512(const float* b, int64_t ld, int64_t first, int64_t n, SparseColumns& out) {
  const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t* count = out.count.data() + first;
  __m512 v[16];
  for (int64_t k0 = 0; k0 < out.K; k0 += 16) {
    const int64_t rows = std::min<int64_t>(16, out.K - k0);
    if (k0 % kSparseKC == 0) {
      for (int64_t j = first; j < first + n; ++j) out.MarkBlock(k0 / kSparseKC, j);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      v[i] = i < rows ? _mm512_maskz_loadu_ps(live, b + (k0 + i) * ld) : _mm512_setzero_ps();
    }
    Transpose16x16(v);  // v[j]: column j at k0 .. k0 + 15
    const __m512i ks = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(k0)));
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= n) break;
      // not equal, unordered: NaN is listed
      const __mmask16 nz = _mm512_cmp_ps_mask(v[j], _mm512_setzero_ps(), _CMP_NEQ_UQ);
      const int64_t at = (first + j) * out.stride + count[j];
      // compressed in registers and stored whole: a compressing store to memory is
      // microcoded on AMD's Zen 4
      _mm512_storeu_ps(out.vals.data() + at, _mm512_maskz_compress_ps(nz, v[j]));
      _mm512_storeu_si512(out.ks.data() + at, _mm512_maskz_compress_epi32(nz, ks));
      count[j] += __builtin_popcount(nz);
    }
  }
}

// out[0..31] (+)= sum over the n entries e of vals[e] * panel[(ks[e] - k0) * 32 + 0..31].
// Four entries per step into four pairs of sums (eight chains of multiply-adds in flight;
// two entries per step measured 3-4 % slower: 128 -> 256 3x3 on 4x4, 0.097 vs 0.094 ms),
// then two, then one.
AVX512_TARGET void SparseColumnKernel(const int32_t* ks, const float* vals, int64_t n, int64_t k0, const float* panel,
                                      float* out, bool accumulate) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  int64_t e = 0;
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
  for (; e + 4 <= n; e += 4) {
    const float* w0 = panel + (ks[e] - k0) * 32;
    const float* w1 = panel + (ks[e + 1] - k0) * 32;
    const float* w2 = panel + (ks[e + 2] - k0) * 32;
    const float* w3 = panel + (ks[e + 3] - k0) * 32;
    const __m512 x0 = _mm512_set1_ps(vals[e]), x1 = _mm512_set1_ps(vals[e + 1]);
    const __m512 x2 = _mm512_set1_ps(vals[e + 2]), x3 = _mm512_set1_ps(vals[e + 3]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + 16), a1);
    b0 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1), b0);
    b1 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1 + 16), b1);
    c0 = _mm512_fmadd_ps(x2, _mm512_loadu_ps(w2), c0);
    c1 = _mm512_fmadd_ps(x2, _mm512_loadu_ps(w2 + 16), c1);
    d0 = _mm512_fmadd_ps(x3, _mm512_loadu_ps(w3), d0);
    d1 = _mm512_fmadd_ps(x3, _mm512_loadu_ps(w3 + 16), d1);
  }
  a0 = _mm512_add_ps(a0, c0);
  a1 = _mm512_add_ps(a1, c1);
  b0 = _mm512_add_ps(b0, d0);
  b1 = _mm512_add_ps(b1, d1);
  for (; e + 2 <= n; e += 2) {
    const float* w0 = panel + (ks[e] - k0) * 32;
    const float* w1 = panel + (ks[e + 1] - k0) * 32;
    const __m512 x0 = _mm512_set1_ps(vals[e]), x1 = _mm512_set1_ps(vals[e + 1]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + 16), a1);
    b0 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1), b0);
    b1 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1 + 16), b1);
  }
  if (e < n) {
    const float* w0 = panel + (ks[e] - k0) * 32;
    const __m512 x0 = _mm512_set1_ps(vals[e]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + 16), a1);
  }
  a0 = _mm512_add_ps(a0, b0);
  a1 = _mm512_add_ps(a1, b1);
  if (accumulate) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(out));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(out + 16));
  }
  _mm512_storeu_ps(out, a0);
  _mm512_storeu_ps(out + 16, a1);
}
#pragma GCC diagnostic pop


// ---------------------------------------------- Winograd F(2x2, 3x3) (AVX-512)
//
// Y = A^T [ (G g G^T) . (B^T d B) ] A on 4x4 input tiles d giving 2x2 output tiles: per
// tile and channel pair 16 multiplies instead of 36.  With G' = 2G on its two middle
// rows the weight transform U' = G' g G'^T is adds only; U' = s_i s_j U (s = 1, 2, 2, 1),
// so the input transform divides by s_i s_j instead.

// The 16 transformed weights of 32 output channels (lanes) for `cc` input channels:
// raw[(c * 9 + tap) * 32 + lane] -> u[(c * 16 + xi) * 32 + lane].
AVX512_TARGET void WinogradWeights(const float* raw, int64_t cc, float* u) {
  for (int64_t c = 0; c < cc; ++c) {
    for (int64_t h = 0; h < 32; h += 16) {
      __m512 g[3][3], r[4][3];
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) g[t / 3][t % 3] = _mm512_loadu_ps(raw + (c * 9 + t) * 32 + h);
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) {
        const __m512 s = _mm512_add_ps(g[0][j], g[2][j]);
        r[0][j] = g[0][j];
        r[1][j] = _mm512_add_ps(s, g[1][j]);
        r[2][j] = _mm512_sub_ps(s, g[1][j]);
        r[3][j] = g[2][j];
      }
      float* out = u + c * 16 * 32 + h;
      constexpr int64_t step = 32;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512 s = _mm512_add_ps(r[i][0], r[i][2]);
        _mm512_storeu_ps(out + (i * 4 + 0) * step, r[i][0]);
        _mm512_storeu_ps(out + (i * 4 + 1) * step, _mm512_add_ps(s, r[i][1]));
        _mm512_storeu_ps(out + (i * 4 + 2) * step, _mm512_sub_ps(s, r[i][1]));
        _mm512_storeu_ps(out + (i * 4 + 3) * step, r[i][2]);
      }
    }
  }
}

// Two transforms xi, xi + 1 of 32 output channels x RT tiles, over cc input channels:
// acc[(t * 16 + x) * 32 + lane] (+)= sum_c u[(c * 16 + x) * 32 + lane] *
// v[x * v_xi + c * v_c + t (+ v_half for lanes 16-31 if kSplit: a second group's
// input channels)].
template <int RT, bool kSplit>
AVX512_TARGET void WinogradKernel(int64_t cc, const float* u, const float* v, int64_t v_xi, int64_t v_c,
                                  int64_t v_half, float* acc, bool first) {
  __m512 a[2][RT][2];
#pragma GCC unroll 16
  for (int q = 0; q < 4 * RT; ++q) {
    const int x = q / (2 * RT), t = q / 2 % RT, h = q % 2;
    a[x][t][h] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (t * 16 + x) * 32 + h * 16);
  }
  const float* v1 = v + v_xi;
  for (int64_t c = 0; c < cc; ++c) {
    const float* uc = u + c * 16 * 32;
    const __m512 u00 = _mm512_loadu_ps(uc), u01 = _mm512_loadu_ps(uc + 16);
    const __m512 u10 = _mm512_loadu_ps(uc + 32), u11 = _mm512_loadu_ps(uc + 48);
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const float* p0 = v + c * v_c + t;
      const float* p1 = v1 + c * v_c + t;
      const __m512 b0 = _mm512_set1_ps(*p0), b1 = _mm512_set1_ps(*p1);
      const __m512 b0h = kSplit ? _mm512_set1_ps(p0[v_half]) : b0;
      const __m512 b1h = kSplit ? _mm512_set1_ps(p1[v_half]) : b1;
      a[0][t][0] = _mm512_fmadd_ps(u00, b0, a[0][t][0]);
      a[0][t][1] = _mm512_fmadd_ps(u01, b0h, a[0][t][1]);
      a[1][t][0] = _mm512_fmadd_ps(u10, b1, a[1][t][0]);
      a[1][t][1] = _mm512_fmadd_ps(u11, b1h, a[1][t][1]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < 4 * RT; ++q) {
    const int x = q / (2 * RT), t = q / 2 % RT, h = q % 2;
    _mm512_storeu_ps(acc + (t * 16 + x) * 32 + h * 16, a[x][t][h]);
  }
}

template <bool kSplit>
AVX512_TARGET void WinogradKernelAny(int64_t rt, int64_t cc, const float* u, const float* v, int64_t v_xi,
                                     int64_t v_c, int64_t v_half, float* acc, bool first) {
  switch (rt) {
    case 1: return WinogradKernel<1, kSplit>(cc, u, v, v_xi, v_c, v_half, acc, first);
    case 2: return WinogradKernel<2, kSplit>(cc, u, v, v_xi, v_c, v_half, acc, first);
    case 3: return WinogradKernel<3, kSplit>(cc, u, v, v_xi, v_c, v_half, acc, first);
    default: return WinogradKernel<4, kSplit>(cc, u, v, v_xi, v_c, v_half, acc, first);
  }
}

// The input transform of channels [c0, c1) for tile rows [r0, r1) (of the whole batch,
// image after image): v[(c * 16 + xi) * tiles + t] with tiles = (r1 - r0) *
// tile_cols; tile t = (r - r0) * tile_cols + j reads input rows 2i - pad_top .. + 3 of
// image n (r = n * tile_rows + i) and columns 2j - pad_left .. + 3 (zero outside the
// image), scaled by 1 / (s_a s_b).  Up to 7 tiles of a tile row at a time: their 16
// input columns are the lanes.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside _mm512_permutexvar_ps
AVX512_TARGET void WinogradInput(const WinogradSpec& s, int64_t c0, int64_t c1, int64_t r0, int64_t r1, float* v) {
  const int64_t rows = (s.out_h + 1) / 2, cols = (s.out_w + 1) / 2, tiles = (r1 - r0) * cols;
  const int64_t plane = s.height * s.width, xi_stride = tiles;
  // lane j of permute b picks input column 2j + b of the chunk
  __m512i pick[4];
  for (int b = 0; b < 4; ++b) {
    alignas(64) int32_t idx[16];
    for (int j = 0; j < 16; ++j) idx[j] = std::min(15, 2 * j + b);
    pick[b] = _mm512_load_si512(idx);
  }
  const __m512 half = _mm512_set1_ps(.5f), quarter = _mm512_set1_ps(.25f);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / rows, i = r % rows;
      const float* src = s.x + (n * s.channels + c) * plane;
      {
        for (int64_t j0 = 0; j0 < cols; j0 += 7) {
          const int64_t count = std::min<int64_t>(7, cols - j0), q0 = 2 * j0 - s.pad_left;
          uint32_t inside = 0;  // lanes l with 0 <= q0 + l < width
          for (int64_t l = 0; l < 16; ++l) inside |= (q0 + l >= 0 && q0 + l < s.width ? 1u : 0u) << l;
          __m512 d[4];
          for (int64_t a = 0; a < 4; ++a) {
            const int64_t r = 2 * i - s.pad_top + a;
            d[a] = r >= 0 && r < s.height
                       ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(inside), src + r * s.width + q0)
                       : _mm512_setzero_ps();
          }
          const __m512 e[4] = {_mm512_sub_ps(d[0], d[2]), _mm512_add_ps(d[1], d[2]), _mm512_sub_ps(d[2], d[1]),
                               _mm512_sub_ps(d[1], d[3])};
          const __mmask16 store = static_cast<__mmask16>((1u << count) - 1u);
          float* out = v + c * 16 * tiles + (r - r0) * cols + j0;
          for (int a = 0; a < 4; ++a) {
            const __m512 p0 = _mm512_permutexvar_ps(pick[0], e[a]), p1 = _mm512_permutexvar_ps(pick[1], e[a]);
            const __m512 p2 = _mm512_permutexvar_ps(pick[2], e[a]), p3 = _mm512_permutexvar_ps(pick[3], e[a]);
            // scale 1 / (s_a s_b), s = 1, 2, 2, 1
            const bool inner_a = a == 1 || a == 2;
            const __m512 outer = inner_a ? half : _mm512_set1_ps(1.f), inner = inner_a ? quarter : half;
            _mm512_mask_storeu_ps(out + (a * 4 + 0) * xi_stride, store, _mm512_mul_ps(_mm512_sub_ps(p0, p2), outer));
            _mm512_mask_storeu_ps(out + (a * 4 + 1) * xi_stride, store, _mm512_mul_ps(_mm512_add_ps(p1, p2), inner));
            _mm512_mask_storeu_ps(out + (a * 4 + 2) * xi_stride, store, _mm512_mul_ps(_mm512_sub_ps(p2, p1), inner));
            _mm512_mask_storeu_ps(out + (a * 4 + 3) * xi_stride, store, _mm512_mul_ps(_mm512_sub_ps(p1, p3), outer));
          }
        }
      }
    }
  }
}

#pragma GCC diagnostic pop

// Output transform of one tile, 32 channels: m[xi * 32 + lane] -> the 2x2 outputs
// o[(a * 2 + b) * 32 + lane].
AVX512_TARGET void WinogradOutput(const float* m, float* o) {
  for (int64_t h = 0; h < 32; h += 16) {
    __m512 r[2][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 m0 = _mm512_loadu_ps(m + (0 + j) * 32 + h), m1 = _mm512_loadu_ps(m + (4 + j) * 32 + h);
      const __m512 m2 = _mm512_loadu_ps(m + (8 + j) * 32 + h), m3 = _mm512_loadu_ps(m + (12 + j) * 32 + h);
      r[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
      r[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
    }
#pragma GCC unroll 2
    for (int a = 0; a < 2; ++a) {
      _mm512_storeu_ps(o + (a * 2 + 0) * 32 + h, _mm512_add_ps(_mm512_add_ps(r[a][0], r[a][1]), r[a][2]));
      _mm512_storeu_ps(o + (a * 2 + 1) * 32 + h, _mm512_sub_ps(_mm512_sub_ps(r[a][1], r[a][2]), r[a][3]));
    }
  }
}

#endif  // ONNX_CODEBOOK_X86

void MicroKernel(int64_t kc, const float* a, const float* b, int64_t ldb, float* tile) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && ldb == kNR) return MicroKernelAvx512<6>(kc, a, b, tile, TileStore{});
  if (g_avx2 && ldb == kNR) return MicroKernelAvx2Full(kc, a, b, tile, TileStore{});
#endif
  MicroKernelPortable(kc, a, b, ldb, tile);
}

// Adds alpha * tile[mr][nr] into C at rows i0.., columns j0.. (with `first` and
// s.init_c, overwrites C with alpha * tile + row_bias instead).
void StoreTile(const GemmSpec& s, const float* tile, int64_t i0, int64_t mr, int64_t j0, int64_t nr, bool first,
               bool last) {
  const bool overwrite = first && s.init_c;
  const Epilogue none;
  const Epilogue& act = last ? s.act : none;
  int64_t col_at[kNR];
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t col = j0 + j;
    col_at[j] = (col / s.col_div) * s.col_outer + col % s.col_div;
  }
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t row = (i0 + i) * s.row_stride;
    const float* t = tile + i * kNR;
    const float base = overwrite && s.row_bias ? s.row_bias[i0 + i] : 0.f;
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t at = row + col_at[j];
      const float prior = overwrite ? base + (s.add ? s.add[at] : 0.f) : s.c[at];
      s.c[at] = act.Apply(prior + s.alpha * t[j]);
    }
  }
}

}  // namespace

bool HasDepthwiseChannels() { return g_avx512; }

void DepthwiseChannels(const DepthwisePlan& plan, int64_t count, const float* x, int64_t in_plane,
                       const float* taps, const float* bias, const float* z, const Epilogue& act, float* y,
                       int64_t out_plane) {
#if ONNX_CODEBOOK_X86
  if (g_avx512) return DepthwiseChannelsAvx512(plan, count, x, in_plane, taps, bias, z, act, y, out_plane);
#endif
  (void)plan, (void)count, (void)x, (void)in_plane, (void)taps, (void)bias, (void)z, (void)act, (void)y,
      (void)out_plane;
  throw std::logic_error("DepthwiseChannels needs AVX-512");
}

void StoreActivated(const Epilogue& act, const float* src, const float* add, float* dst, int64_t n) {
#if ONNX_CODEBOOK_X86
  if (g_avx512) return StoreActivatedAvx512(act, src, add, dst, n);
  if (g_avx2) return StoreActivatedAvx2(act, src, add, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = act.Apply(src[i] + (add ? add[i] : 0.f));
}

bool UsesAvx2() { return g_avx2; }
bool UsesAvx512() { return g_avx512; }

void DecodeRow(const CodebookWeight& w, int64_t r, int64_t k0, int64_t count, float* out) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && w.bits <= 4) {
    return g_vbmi ? DecodeRowsAvx512<true>(w, r, 1, k0, count, out, 0)
                  : DecodeRowsAvx512<false>(w, r, 1, k0, count, out, 0);
  }
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
  if (g_avx512 && w.bits <= 4 && width % 16 == 0) {
    return g_vbmi ? PackWeightPanelsAvx512<true>(w, row0, i0, n, k0, kc, width, dst)
                  : PackWeightPanelsAvx512<false>(w, row0, i0, n, k0, kc, width, dst);
  }
  if (g_avx2 && (width == 6 || width % 8 == 0)) {
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

void PackWeightRows(const CodebookWeight& w, int64_t row0, int64_t i0, int64_t n, int64_t k0, int64_t kc, float* dst) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && w.bits <= 4) {
    return g_vbmi ? DecodeRowsAvx512<true>(w, row0 + i0, n, k0, kc, dst, kKC)
                  : DecodeRowsAvx512<false>(w, row0 + i0, n, k0, kc, dst, kKC);
  }
#endif
  for (int64_t r = 0; r < n; ++r) DecodeRow(w, row0 + i0 + r, k0, kc, dst + r * kKC);
}

void RowsTimesWeight(const CodebookWeight& w, const float* a, int64_t lda, int64_t rows_a, int64_t r0, int64_t r1,
                     float alpha, float* y, int64_t ldy, int64_t ldr, const Epilogue& act) {
#if ONNX_CODEBOOK_X86
  // 16 weights per decode, and with 3+ rows of A several weight rows per activation load
  if (g_avx512 && w.bits <= 4) {
    return g_vbmi ? RowsTimesWeightAvx512Dispatch<true>(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act)
                  : RowsTimesWeightAvx512Dispatch<false>(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act);
  }
  if (g_avx2) {
    switch (KindOf(w)) {
      case LutKind::kPermute8:
        return RowsTimesWeightDispatch<LutKind::kPermute8>(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act);
      case LutKind::kPermute16:
        return RowsTimesWeightDispatch<LutKind::kPermute16>(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act);
      case LutKind::kGather:
        return RowsTimesWeightDispatch<LutKind::kGather>(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act);
    }
  }
#endif
  RowsTimesWeightPortable(w, a, lda, rows_a, r0, r1, alpha, y, ldy, ldr, act);
}

CallBuffer::CallBuffer(const OrtKernelContext* ctx, size_t floats) {
  const size_t bytes = std::max<size_t>(1, floats) * sizeof(float);
  if (ctx != nullptr) {
    const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetAllocator(ctx, cpu, &allocator_));
    data_ = static_cast<float*>(allocator_->Alloc(allocator_, bytes));
  } else {
    data_ = static_cast<float*>(std::malloc(bytes));
  }
  if (data_ == nullptr) {
    if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
    throw std::bad_alloc();
  }
}

CallBuffer::~CallBuffer() {
  if (allocator_ != nullptr) {
    allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  } else {
    std::free(data_);
  }
}

namespace {

thread_local bool t_inline = false;     // inside an InlineParallelFor scope
thread_local int64_t t_pool_seen = 1;   // see PoolThreadsSeen

// A small number per thread, in the order threads first ask.
uint64_t ThreadSlot() {
  static std::atomic<uint64_t> next{0};
  thread_local const uint64_t slot = next++;
  return slot;
}

// For counting the threads of a parallel loop.
uint64_t ThreadBit() { return uint64_t{1} << (ThreadSlot() % 64); }

}  // namespace

InlineParallelFor::InlineParallelFor(bool on) : outer_(t_inline) { t_inline = t_inline || on; }
InlineParallelFor::~InlineParallelFor() { t_inline = outer_; }

int64_t PoolThreadsSeen() { return t_pool_seen; }
void ResetPoolThreadsSeen() { t_pool_seen = 1; }

void ParallelFor(const OrtKernelContext* ctx, int64_t total, const std::function<void(int64_t)>& fn) {
  if (total <= 0) return;
  if (ctx == nullptr || total == 1 || t_inline) {
    for (int64_t i = 0; i < total; ++i) fn(i);
    return;
  }
  struct Job {
    const std::function<void(int64_t)>* fn;
    std::atomic<bool> failed{false};
    std::atomic<uint64_t> threads{0};
    std::mutex mu;
    std::exception_ptr error;
  } job;
  job.fn = &fn;
  auto trampoline = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    j->threads.fetch_or(ThreadBit(), std::memory_order_relaxed);
    if (j->failed.load(std::memory_order_relaxed)) return;
    try {
      (*j->fn)(static_cast<int64_t>(i));
    } catch (...) {
      std::lock_guard<std::mutex> lock(j->mu);
      if (!j->failed.exchange(true)) j->error = std::current_exception();
    }
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, trampoline, static_cast<size_t>(total), 0, &job));
  t_pool_seen = std::max<int64_t>(t_pool_seen, __builtin_popcountll(job.threads.load()));
  if (job.error) std::rethrow_exception(job.error);
}

void ParallelParts(const OrtKernelContext* ctx, int64_t parts, const std::function<void(int64_t)>& fn) {
  if (parts <= 0) return;
  std::unique_ptr<std::atomic<bool>[]> taken(new std::atomic<bool>[static_cast<size_t>(parts)]);
  for (int64_t p = 0; p < parts; ++p) taken[p].store(false, std::memory_order_relaxed);
  ParallelFor(ctx, parts, [&](int64_t) {
    int64_t part = static_cast<int64_t>(ThreadSlot() % static_cast<uint64_t>(parts));
    if (taken[part].exchange(true)) {
      for (part = 0; part < parts && taken[part].exchange(true); ++part) {
      }
    }
    if (part < parts) fn(part);
  });
}

namespace {

// Task tiles: enough tasks for the intra-op pool, tiles small enough for the caches,
// and as little repeated packing as possible (every N tile repacks its A rows,
// every M tile its B columns).
// pack_b_cost: cycles per packed element of B (s.pack_b_cost, or 0 when B is read in place).
void ChooseTiles(const GemmSpec& s, double pack_b_cost, int64_t workers, int64_t* bm_out, int64_t* bn_out) {
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
                          pack_b_cost * static_cast<double>(s.N) * static_cast<double>(tiles_m);
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

// Strips of kNR columns of a direct B (see GemmSpec::b_direct), zero past N.
void PackDirectStrips(const GemmSpec& s, int64_t j0, int64_t nj, int64_t k0, int64_t kc, float* dst) {
  for (int64_t q = 0; q * kNR < nj; ++q) {
    const int64_t live = std::min(kNR, nj - q * kNR);
    const float* src = s.b_direct + j0 + q * kNR;
    float* strip = dst + q * kNR * kc;
    for (int64_t k = 0; k < kc; ++k) {
      float* out = strip + k * kNR;
      std::memcpy(out, src + s.b_offsets[k0 + k], static_cast<size_t>(live) * sizeof(float));
      for (int64_t j = live; j < kNR; ++j) out[j] = 0.f;
    }
  }
}

}  // namespace

// B floats a panel sweeps per visit (see RunGemm).
constexpr int64_t kStripGroupFloats = 4096;

void RunGemm(const GemmSpec& s, const OrtKernelContext* ctx) {
  if (s.M <= 0 || s.N <= 0) return;
  // Direct B is read in place by the AVX-512 kernel when C is written by it too,
  // against A packed as weight rows (pack_a_rows).
  const bool direct = s.b_direct != nullptr && g_avx512 && s.col_div >= kNR;
  // A as rows (pack_a_rows) on the AVX-512 path: with a direct B, or where the caller
  // prefers it (copying rows of activations costs less than transposing them into panels).
  const bool rows_a = direct || (g_avx512 && s.prefer_rows_a && s.pack_a_rows);
  int64_t bm = 0, bn = 0;
  ChooseTiles(s, direct ? 0.0 : s.pack_b_cost, ctx ? PoolWorkers() : 1, &bm, &bn);
  const int64_t tiles_m = (s.M + bm - 1) / bm;
  const int64_t tiles_n = (s.N + bn - 1) / bn;
  ParallelFor(ctx, tiles_m * tiles_n, [&](int64_t t) {
    thread_local std::vector<float> a_buf, b_buf;
    const int64_t i0 = (t % tiles_m) * bm, j0 = (t / tiles_m) * bn;
    const int64_t mi = std::min(bm, s.M - i0), nj = std::min(bn, s.N - j0);
    const int64_t panels = (mi + kMR - 1) / kMR, strips = (nj + kNR - 1) / kNR;
    float* a = Scratch(a_buf, static_cast<size_t>(panels * kMR * kKC + kPackSlack));
    // Direct B: only a partial last strip is packed (the kernel reads whole strips).
    float* b = Scratch(b_buf, static_cast<size_t>((direct ? 1 : strips) * kNR * kKC + kPackSlack));
    alignas(32) float tile[kMR * kNR];
    for (int64_t k0 = 0; k0 < s.K; k0 += kKC) {
      const int64_t kc = std::min(kKC, s.K - k0);
      const bool last = k0 + kc >= s.K;
      if (rows_a) {
        s.pack_a_rows(i0, mi, k0, kc, a);
      } else {
        s.pack_a(i0, mi, k0, kc, a);
      }
      if (s.b_direct == nullptr) {
        s.pack_b(j0, nj, k0, kc, b);
      } else if (!direct) {
        PackDirectStrips(s, j0, nj, k0, kc, b);
      }
      // Micro-tile (panel p, strip q); returns how many panels it covered (a pair: 2).
      auto micro_tile = [&](int64_t p, int64_t q) -> int64_t {
        const int64_t nr = std::min(kNR, nj - q * kNR);
        const int64_t jc = j0 + q * kNR;
        int64_t mr = std::min(kMR, mi - p * kMR);
#if ONNX_CODEBOOK_X86
        const int64_t jr = jc % s.col_div;
        const bool whole = mr == kMR && nr == kNR && jr + kNR <= s.col_div;
        if (direct || (g_avx2 && whole) || (g_avx512 && s.col_div >= kNR)) {
          const bool pair = g_avx512 && p + 1 < panels;  // two panels, 12 rows, in one call
          if (pair) mr = std::min(2 * kMR, mi - p * kMR);
          float* c = s.c + (i0 + p * kMR) * s.row_stride + (jc / s.col_div) * s.col_outer + jr;
          TileStore st;
          st.mr = mr;
          st.nr = nr;
          st.split = std::min(kNR, s.col_div - jr);
          st.jump = st.split < nr ? s.col_outer - s.col_div : 0;  // no far columns: no far address
          st.c = c;
          st.ldc = s.row_stride;
          st.alpha = s.alpha;
          st.first = s.init_c && k0 == 0;
          st.bias = s.row_bias ? s.row_bias + i0 + p * kMR : nullptr;
          st.add = st.first && s.add ? s.add + (c - s.c) : nullptr;
          st.last = last;
          st.act = &s.act;
          if (rows_a) {
            const float* ap = a + p * kMR * kKC;  // rows of A
            if (direct && nr == kNR) {            // B read in place
              const int64_t* off = s.b_offsets + k0;
              pair ? MicroKernelAvx512<12, true, true>(kc, ap, s.b_direct + jc, nullptr, st, off)
                   : MicroKernelAvx512<6, true, true>(kc, ap, s.b_direct + jc, nullptr, st, off);
            } else {
              // B packed; of a direct B only a partial strip is, here (the kernel reads whole strips)
              if (direct && p == 0) PackDirectStrips(s, jc, nr, k0, kc, b);
              const float* bq = direct ? b : b + q * kNR * kc;
              pair ? MicroKernelAvx512<12, false, true>(kc, ap, bq, nullptr, st)
                   : MicroKernelAvx512<6, false, true>(kc, ap, bq, nullptr, st);
            }
          } else if (pair) {
            MicroKernelAvx512<12>(kc, a + p * kMR * kc, b + q * kNR * kc, nullptr, st);
          } else if (g_avx512) {
            MicroKernelAvx512<6>(kc, a + p * kMR * kc, b + q * kNR * kc, nullptr, st);
          } else {
            MicroKernelAvx2Full(kc, a + p * kMR * kc, b + q * kNR * kc, nullptr, st);
          }
          return pair ? 2 : 1;
        }
#endif
        MicroKernel(kc, a + p * kMR * kc, b + q * kNR * kc, kNR, tile);
        StoreTile(s, tile, i0 + p * kMR, mr, jc, nr, k0 == 0, last);
        return 1;
      };
      // Each panel visits a group of strips in turn: with a short reduction block the
      // group's B stays in L1 and the panel writes longer runs of each C row (fewer
      // pages and cache lines in flight); with a long block the group is one strip.
      const int64_t group = std::clamp<int64_t>(kStripGroupFloats / (kc * kNR), 1, strips);
      for (int64_t q0 = 0; q0 < strips; q0 += group) {
        const int64_t q1 = std::min(strips, q0 + group);
        for (int64_t p = 0; p < panels;) {
          int64_t covered = 1;
          for (int64_t q = q0; q < q1; ++q) covered = micro_tile(p, q);
          p += covered;
        }
      }
    }
  });
}

float* Scratch(std::vector<float>& buf, size_t n) {
  constexpr size_t kAlignFloats = 16;  // 64 bytes
  if (buf.size() < n + kAlignFloats) buf.resize(n + kAlignFloats);
  const auto at = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + ((64 - at % 64) % 64) / sizeof(float);
}

int64_t PoolWorkers() {
  // read once, like the CPU feature flags (it was a system call per kernel call)
  static const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(64, std::thread::hardware_concurrency()));
  return t_inline ? 1 : workers;
}

bool HasPixelGemm() { return g_pixel_gemm; }
bool ForcePixelGemm() { return g_force_pixel_gemm; }

void RunPixelGemm(const PixelGemmSpec& s, const OrtKernelContext* ctx) {
#if ONNX_CODEBOOK_X86
  if (!g_avx512) throw std::logic_error("RunPixelGemm needs AVX-512");
  if (s.M <= 0 || s.num_tiles <= 0) return;
  // Tasks: (group, block of 32 output channels), times parts of the tile list when
  // there are too few of those for the pool (each part decodes the block's weights
  // again).
  const int64_t workers = PoolWorkers();
  const int64_t blocks = (s.M + 31) / 32, units = s.groups * blocks;
  const int64_t parts = std::clamp<int64_t>((2 * workers + units - 1) / units, 1, s.num_tiles);
  // The C columns of each part: [col0, col1), and whether any tile is strided (then
  // they are stored in the runs the part's tiles cover).
  struct Part {
    int64_t t0, t1, col0, col1;
    std::vector<std::pair<int64_t, int64_t>> runs;
  };
  std::vector<Part> part_of(static_cast<size_t>(parts));
  for (int64_t part = 0; part < parts; ++part) {
    Part& p = part_of[part];
    p.t0 = s.num_tiles * part / parts;
    p.t1 = s.num_tiles * (part + 1) / parts;
    p.col0 = INT64_MAX;
    p.col1 = 0;
    bool strided = false;
    for (int64_t t = p.t0; t < p.t1; ++t) {
      const PixelTile& tile = s.tiles[t];
      p.col0 = std::min(p.col0, tile.out);
      p.col1 = std::max(p.col1, tile.out + (tile.length - 1) * tile.out_step + 1);
      strided = strided || (tile.length > 1 && tile.out_step != 1);
    }
    if (p.t0 >= p.t1) continue;
    if (!strided) {
      p.runs.emplace_back(p.col0, p.col1);
      continue;
    }
    std::vector<uint8_t> covered(static_cast<size_t>(p.col1 - p.col0), 0);
    for (int64_t t = p.t0; t < p.t1; ++t) {
      const PixelTile& tile = s.tiles[t];
      for (int64_t i = 0; i < tile.length; ++i) covered[tile.out + i * tile.out_step - p.col0] = 1;
    }
    for (int64_t c = 0; c < p.col1 - p.col0;) {
      if (!covered[c]) {
        ++c;
        continue;
      }
      const int64_t begin = c;
      while (c < p.col1 - p.col0 && covered[c]) ++c;
      p.runs.emplace_back(p.col0 + begin, p.col0 + c);
    }
  }
  ParallelFor(ctx, units * parts, [&](int64_t task) {
    thread_local std::vector<float> panel_buf, acc_buf;
    const int64_t unit = task % units;
    const Part& p = part_of[task / units];
    if (p.t0 >= p.t1) return;
    const int64_t grp = unit / blocks, block = unit % blocks;
    const int64_t i0 = block * 32, rows = std::min<int64_t>(32, s.M - i0);
    float* panel = Scratch(panel_buf, static_cast<size_t>(32 * kKC + kPackSlack));
    float* acc = Scratch(acc_buf, static_cast<size_t>((p.col1 - p.col0) * 32));
    PixelArgs a{};
    a.b = s.b + grp * s.group_b;
    a.boff = s.b_offsets;
    a.panel = panel;
    for (int64_t k0 = 0; k0 < s.K; k0 += kKC) {
      const int64_t kc = std::min(kKC, s.K - k0);
      PackWeightPanels(*s.w, s.row0 + grp * s.M, i0, rows, k0, kc, 32, panel);
      a.k0 = k0;
      a.accumulate = k0 > 0;
      for (int64_t t = p.t0; t < p.t1; ++t) {
        const PixelTile& tile = s.tiles[t];
        a.kc = kc;
        a.ks = nullptr;
        if (tile.klass >= s.num_k_lists) throw std::logic_error("RunPixelGemm: tile class out of range");
        if (tile.klass >= 0) {  // the block's part of the tile's list
          const std::vector<int32_t>& list = s.k_lists[tile.klass];
          const auto lo = std::lower_bound(list.begin(), list.end(), k0);
          a.ks = list.data() + (lo - list.begin());
          a.kc = std::lower_bound(lo, list.end(), k0 + kc) - lo;
        }
        a.b = s.b + grp * s.group_b + tile.grid;
        a.bstep = tile.grid_step;
        a.out = acc + (tile.out - p.col0) * 32;
        a.ostep = tile.out_step * 32;
        RunPixelKernel(tile.length, a);
      }
    }
    for (const auto& [c0, c1] : p.runs) StorePixelBlock(s, acc + (c0 - p.col0) * 32, grp * s.M + i0, rows, c0, c1);
  });
#else
  (void)s, (void)ctx;
  throw std::logic_error("RunPixelGemm needs AVX-512");
#endif
}

void RunLaneGemm(const PixelGemmSpec& s, int64_t columns, const OrtKernelContext* ctx) {
#if ONNX_CODEBOOK_X86
  if (!g_avx512) throw std::logic_error("RunLaneGemm needs AVX-512");
  if (columns < 1 || columns > kLaneColumns) throw std::logic_error("RunLaneGemm: " + std::to_string(columns) + " columns");
  if (s.M <= 0) return;
  const int64_t blocks = (s.M + kLaneRows - 1) / kLaneRows;
  ParallelFor(ctx, s.groups * blocks, [&](int64_t task) {
    thread_local std::vector<float> rows_buf, next_buf, acc_buf;
    const int64_t grp = task / blocks, i0 = task % blocks * kLaneRows;
    const int64_t rows = std::min<int64_t>(kLaneRows, s.M - i0);
    float* acc = Scratch(acc_buf, static_cast<size_t>(kLaneRows * 16));
    LaneTask(s, s.b + grp * s.group_b, s.row0 + grp * s.M + i0, rows,
             Scratch(rows_buf, static_cast<size_t>(kLaneRows * kKC)),
             Scratch(next_buf, static_cast<size_t>(kLaneRows * kKC)), acc);
    StoreLaneRows(s, acc, grp * s.M + i0, rows, columns);
  });
#else
  (void)s, (void)columns, (void)ctx;
  throw std::logic_error("RunLaneGemm needs AVX-512");
#endif
}

bool HasSparseGemm() { return g_sparse; }
bool ForceSparseGemm() { return g_force_sparse; }

int64_t CountNonzeros(const float* x, int64_t n) {
  int64_t count = 0, i = 0;
#if ONNX_CODEBOOK_X86
  if (g_avx512) count = CountNonzerosAvx512(x, n, &i);
#endif
  for (; i < n; ++i) count += x[i] != 0.f;
  return count;
}

void SparseColumns::Reset(int64_t depth, int64_t n) {
  K = depth;
  columns = n;
  stride = K + 16;  // each list's stores write up to 15 entries past its end
  ks.resize(static_cast<size_t>(columns * stride));
  vals.resize(static_cast<size_t>(columns * stride));
  count.assign(static_cast<size_t>(columns), 0);
  blocks.assign(static_cast<size_t>(((K + kSparseKC - 1) / kSparseKC + 1) * columns), 0);
}

void ListNonzeros(const float* b, int64_t ld, int64_t first, int64_t n, SparseColumns& out) {
  if (n < 1 || n > 16 || first < 0 || first + n > out.columns) {
    throw std::logic_error("ListNonzeros: columns [" + std::to_string(first) + ", " + std::to_string(first + n) +
                           ") of " + std::to_string(out.columns));
  }
  const int64_t nblocks = (out.K + kSparseKC - 1) / kSparseKC;
#if ONNX_CODEBOOK_X86
  if (g_avx512) {
    ListNonzerosAvx512(b, ld, first, n, out);
  } else
#endif
  {
    for (int64_t k = 0; k < out.K; ++k) {
      if (k % kSparseKC == 0) {
        for (int64_t j = first; j < first + n; ++j) out.MarkBlock(k / kSparseKC, j);
      }
      for (int64_t j = 0; j < n; ++j) {
        const float v = b[k * ld + j];
        if (v == 0.f) continue;
        const int64_t at = (first + j) * out.stride + out.count[first + j]++;
        out.ks[at] = static_cast<int32_t>(k);
        out.vals[at] = v;
      }
    }
  }
  for (int64_t j = first; j < first + n; ++j) out.MarkBlock(nblocks, j);
}

void RunSparseGemm(const PixelGemmSpec& s, const SparseColumns& b, const OrtKernelContext* ctx) {
#if ONNX_CODEBOOK_X86
  if (!g_avx512) throw std::logic_error("RunSparseGemm needs AVX-512");
  if (s.groups != 1 || b.K != s.K) throw std::logic_error("RunSparseGemm: one group of the lists' depth only");
  if (s.M <= 0) return;
  const int64_t blocks = (s.M + 31) / 32, columns = b.columns;
  ParallelFor(ctx, blocks, [&](int64_t block) {
    thread_local std::vector<float> panel_buf, acc_buf;
    const int64_t i0 = block * 32, rows = std::min<int64_t>(32, s.M - i0);
    float* panel = Scratch(panel_buf, static_cast<size_t>(32 * kSparseKC + kPackSlack));
    float* acc = Scratch(acc_buf, static_cast<size_t>(columns * 32));
    for (int64_t k0 = 0; k0 < s.K; k0 += kSparseKC) {
      const int64_t kc = std::min(kSparseKC, s.K - k0);
      PackWeightPanels(*s.w, s.row0, i0, rows, k0, kc, 32, panel);
      const int64_t* first = b.blocks.data() + k0 / kSparseKC * columns;
      for (int64_t j = 0; j < columns; ++j) {
        SparseColumnKernel(b.ks.data() + first[j], b.vals.data() + first[j], first[columns + j] - first[j], k0, panel,
                           acc + j * 32, k0 > 0);
      }
    }
    StorePixelBlock(s, acc, i0, rows, 0, columns);
  });
#else
  (void)s, (void)b, (void)ctx;
  throw std::logic_error("RunSparseGemm needs AVX-512");
#endif
}

bool HasWinograd() { return g_winograd; }

// Floats of transformed input RunWinogradConv makes at a time (512 KB: it stays in L2
// until the tasks read it; at 4 MB, 24->48 on 96x96 took 0.90 of fp32 against 0.78, 64->64
// on 224x224 0.82 against 0.69), and up to which every thread of a pool makes its own
// copy of a small input (1 MB).
constexpr int64_t kWinogradInputFloats = int64_t{1} << 17, kWinogradOwnInputFloats = int64_t{1} << 18;

void RunWinogradConv(const WinogradSpec& s, const OrtKernelContext* ctx) {
#if ONNX_CODEBOOK_X86
  if (!g_avx512) throw std::logic_error("RunWinogradConv needs AVX-512");
  const int64_t rows = (s.out_h + 1) / 2, cols = (s.out_w + 1) / 2;
  const int64_t C = s.channels, M = s.out.M, P = s.out_h * s.out_w;
  if (M <= 0 || s.batch * rows * cols <= 0) return;
  const int64_t groups = std::max<int64_t>(1, s.groups), cpg = C / groups, mpg = M / groups;
  if (groups > 1 && (C % groups != 0 || M % groups != 0 || mpg % 16 != 0)) {
    throw std::logic_error("RunWinogradConv: grouped, its groups' output channels must be multiples of 16");
  }
  // Input channels per decoded and transformed weight chunk (its 32 KB stay in L1), and
  // tiles per task (their sums, 2 KB each, in L2).  Measured on 1 thread: 8 or 32
  // channels, 32 tiles, slower (256->256 on 14x14: 1.28 ms at 16 / 64, 1.45-1.54
  // otherwise); 128 tiles no faster.
  constexpr int64_t kChannels = 16, kTiles = 64;
  const int64_t blocks = (M + 31) / 32;
  const int64_t tile_rows = s.batch * rows, chunk_rows = std::max<int64_t>(1, kTiles / cols);
  // The transformed input (4x the input's floats) is made for bands of whole chunks of
  // tile rows, band after band, each of at most kWinogradInputFloats unless one chunk is
  // more.
  const int64_t band_rows = std::max(chunk_rows, kWinogradInputFloats / (16 * C * cols) / chunk_rows * chunk_rows);
  auto first_column = [&](int64_t r) { return r / rows * P + std::min(s.out_h, 2 * (r % rows)) * s.out_w; };
  // One task: the tile rows [r0, r1) of a band starting at tile row `band` (v: its
  // transformed input, [channel][xi][tile]: the 16 rows one channel's transform writes
  // lie together) for the output channels of `block`.  A task's outputs are a
  // contiguous run of columns.
  auto run = [&](int64_t band, int64_t band_end, int64_t r0, int64_t r1, int64_t block, const float* v) {
    thread_local std::vector<float> raw_buf, u_buf, acc_buf, out_buf;
    const int64_t co0 = block * 32, live = std::min<int64_t>(32, M - co0);
    const int64_t band_tiles = (band_end - band) * cols;
    const int64_t t0 = (r0 - band) * cols, nt = (r1 - r0) * cols;
    const int64_t col0 = first_column(r0), col1 = first_column(r1);
    float* raw = Scratch(raw_buf, static_cast<size_t>(kChannels * 9 * 32 + kPackSlack));
    float* u = Scratch(u_buf, static_cast<size_t>(16 * kChannels * 32));
    float* acc = Scratch(acc_buf, static_cast<size_t>(nt * 16 * 32));    // [tile][xi][32]
    float* out = Scratch(out_buf, static_cast<size_t>((col1 - col0) * 32));  // [column][32]
    // the input channels of lanes 0-15 start at channel c_lo, those of lanes 16-31
    // v_half floats of v further on (a second group, if the block spans two)
    const int64_t grp = co0 / mpg, c_lo = grp * cpg;
    const int64_t v_half = (std::min(co0 + 16, M - 1) / mpg - grp) * cpg * 16 * band_tiles;
    for (int64_t c0 = 0; c0 < cpg; c0 += kChannels) {
      const int64_t cc = std::min(kChannels, cpg - c0);
      PackWeightPanels(*s.out.w, s.out.row0 + co0, 0, live, c0 * 9, cc * 9, 32, raw);
      WinogradWeights(raw, cc, u);
      for (int64_t xi = 0; xi < 16; xi += 2) {
        for (int64_t t = 0; t < nt; t += 4) {
          const int64_t rt = std::min<int64_t>(4, nt - t);
          const float* vt = v + ((c_lo + c0) * 16 + xi) * band_tiles + t0 + t;
          float* at = acc + (t * 16 + xi) * 32;
          v_half != 0
              ? WinogradKernelAny<true>(rt, cc, u + xi * 32, vt, band_tiles, 16 * band_tiles, v_half, at, c0 == 0)
              : WinogradKernelAny<false>(rt, cc, u + xi * 32, vt, band_tiles, 16 * band_tiles, 0, at, c0 == 0);
        }
      }
    }
    alignas(64) float o[4 * 32];
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t r = r0 + t / cols, n = r / rows, i = r % rows, j = t % cols;
      WinogradOutput(acc + t * 16 * 32, o);
      for (int64_t a = 0; a < 2 && 2 * i + a < s.out_h; ++a) {
        for (int64_t b = 0; b < 2 && 2 * j + b < s.out_w; ++b) {
          const int64_t col = n * P + (2 * i + a) * s.out_w + 2 * j + b;
          std::memcpy(out + (col - col0) * 32, o + (a * 2 + b) * 32, 32 * sizeof(float));
        }
      }
    }
    StorePixelBlock(s.out, out, co0, live, col0, col1);
  };
  // Tile rows [first, last) band by band, on the pool (or, with ctx null, on this
  // thread alone).
  auto run_rows = [&](int64_t first, int64_t last, const OrtKernelContext* pool) {
    for (int64_t band = first; band < last; band += band_rows) {
      const int64_t band_end = std::min(last, band + band_rows);
      const int64_t chunks = (band_end - band + chunk_rows - 1) / chunk_rows, tasks = chunks * blocks;
      const int64_t v_size = 16 * C * (band_end - band) * cols;
      auto task = [&](int64_t t, const float* v) {
        const int64_t r0 = band + t / blocks * chunk_rows;
        run(band, band_end, r0, std::min(band_end, r0 + chunk_rows), t % blocks, v);
      };
      // (On a pool whose size is not known yet, the shared path's loop over the tasks
      // finds it out.)
      const int64_t parts = pool ? std::min(s.threads, tasks) : 1;
      if (pool == nullptr || (s.threads >= 2 && v_size <= kWinogradOwnInputFloats)) {
        // Alone, or a small input on a pool of 2+ threads: each thread transforms it
        // itself and runs its share of the tasks, so that no thread reads what another
        // wrote.
        ParallelFor(parts == 1 ? nullptr : pool, parts, [&](int64_t part) {
          thread_local std::vector<float> own;
          float* v = Scratch(own, static_cast<size_t>(v_size));
          WinogradInput(s, 0, C, band, band_end, v);
          for (int64_t t = tasks * part / parts; t < tasks * (part + 1) / parts; ++t) task(t, v);
        });
        continue;
      }
      CallBuffer v_buf(pool, static_cast<size_t>(v_size));
      float* v = v_buf.data();
      const int64_t pieces = std::min<int64_t>(C, 4 * PoolWorkers());
      ParallelFor(pool, pieces, [&](int64_t piece) {
        WinogradInput(s, C * piece / pieces, C * (piece + 1) / pieces, band, band_end, v);
      });
      ParallelFor(pool, tasks, [&](int64_t t) { task(t, v); });
    }
  };
  if (s.threads >= 2 && tile_rows * cols >= s.threads * kTiles && tile_rows >= s.threads) {
    // Enough tiles for a chunk per thread: each thread takes a share of the tile rows,
    // transforms their input and runs them for all output channels, reading only what
    // it wrote (the same share in every call where it can).
    ParallelParts(ctx, s.threads, [&](int64_t part) {
      InlineParallelFor inline_here;
      run_rows(tile_rows * part / s.threads, tile_rows * (part + 1) / s.threads, nullptr);
    });
    return;
  }
  run_rows(0, tile_rows, ctx);
#else
  (void)s, (void)ctx;
  throw std::logic_error("RunWinogradConv needs AVX-512");
#endif
}

DepthwisePlan PlanDepthwise(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, int64_t pad_top, int64_t pad_left, int64_t out_h,
                            int64_t out_w) {
  DepthwisePlan d{height, width, kh, kw, sh, sw, dh, dw, pad_top, pad_left, out_h, out_w, 0, 0, {}};
  d.padded_h = (out_h - 1) * sh + (kh - 1) * dh + 1;
  const int64_t out_w16 = (out_w + 15) / 16 * 16;  // the row kernels read whole vectors
  d.phase_w = out_w16 + ((kw - 1) * dw) / sw + 1;
  d.offsets.resize(static_cast<size_t>(kh * kw));
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t c = j * dw;
      d.offsets[i * kw + j] = ((c % sw) * d.padded_h + i * dh) * d.phase_w + c / sw;
    }
  }
  return d;
}

void GatherColumns(const float* src, int64_t reach, const int32_t* offsets, int64_t n, float* dst) {
#if ONNX_CODEBOOK_X86
  if (g_avx512) return GatherColumnsAvx512(src, reach, offsets, n, dst);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = offsets[j] >= 0 ? src[offsets[j]] : 0.f;
}

void GatherRows(const float* src, int64_t reach, const int32_t* offsets, int64_t span, int64_t taps, int64_t ld,
                float* dst) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && reach <= 16 && ld <= 16) return GatherRowsAvx512(src, reach, offsets, span, taps, ld, dst);
#endif
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t at = 0; at < ld; at += 16) {
      GatherColumns(src, reach, offsets + t * span + at, std::min<int64_t>(16, ld - at), dst + t * ld + at);
    }
  }
}

void AddStrided(float* dst, const float* src, int64_t n, int64_t stride) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && stride <= 2) return AddStridedAvx512(dst, src, n, stride);
#endif
  for (int64_t u = 0; u < n; ++u) dst[u * stride] += src[u];
}

void PaddedRow(const float* src, int64_t lo, int64_t hi, int64_t stride, int64_t n, float* dst) {
#if ONNX_CODEBOOK_X86
  if (g_avx512 && stride <= 2) {
    if (src == nullptr) {
      ZeroRowAvx512(dst, n);
    } else if (stride == 1) {
      CopyRowAvx512(dst, src, lo, hi, n);
    } else {
      ZeroRowAvx512(dst, n);
      GatherStride2Avx512(dst, src, lo, hi);
    }
    return;
  }
#endif
  if (src == nullptr) {
    std::fill_n(dst, n, 0.f);
    return;
  }
  std::fill(dst, dst + lo, 0.f);
  if (stride == 1) {
    std::memcpy(dst + lo, src + lo, static_cast<size_t>(hi - lo) * sizeof(float));
  } else {
    for (int64_t t = lo; t < hi; ++t) dst[t] = src[t * stride];
  }
  std::fill(dst + hi, dst + n, 0.f);
}

void DepthwisePlane(const DepthwisePlan& d, const float* x, const float* taps, float bias, const float* z,
                    const Epilogue& act, float* y) {
  // Zero-padded copy of the input plane, split into `sw` column phases so that
  // every tap reads a contiguous run: phase q, column t holds padded column q + t*sw.
  thread_local std::vector<float> phase_buf;
  float* phases = Scratch(phase_buf, static_cast<size_t>(d.sw * d.padded_h * d.phase_w));
  for (int64_t q = 0; q < d.sw; ++q) {
    // column t reads iw = t * sw + first; valid when 0 <= iw < width
    const int64_t first = q - d.pad_left;
    const auto [lo, hi] = InsideColumns(first, d.sw, d.width, d.phase_w);
    for (int64_t r = 0; r < d.padded_h; ++r) {
      float* dst = phases + (q * d.padded_h + r) * d.phase_w;
      const int64_t ih = r - d.pad_top;
      PaddedRow(ih >= 0 && ih < d.height ? x + ih * d.width + first : nullptr, lo, hi, d.sw, d.phase_w, dst);
    }
  }
  const std::vector<int64_t>& offsets = d.offsets;
#if ONNX_CODEBOOK_X86
  if (g_avx512) return DepthwiseRowsAvx512(d, phases, taps, offsets.data(), bias, z, act, y);
  if (g_avx2) return DepthwiseRowsAvx2(d, phases, taps, offsets.data(), bias, z, act, y);
#endif
  for (int64_t oh = 0; oh < d.out_h; ++oh) {
    float* yrow = y + oh * d.out_w;
    const float* base = phases + oh * d.sh * d.phase_w;
    for (int64_t ow = 0; ow < d.out_w; ++ow) {
      float acc = bias;
      for (int64_t t = 0; t < d.kh * d.kw; ++t) acc += taps[t] * base[offsets[t] + ow];
      yrow[ow] = act.Apply(acc + (z ? z[oh * d.out_w + ow] : 0.f));
    }
  }
}

}  // namespace onnx_codebook
