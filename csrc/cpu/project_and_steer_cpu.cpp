// CPU kernels of emokern::project and emokern::project_and_steer_.
//
// The work is two products per token (P = h V^T, then delta V) around a cheap elementwise step, so the kernel is
// compute-bound and its job is to run both products at full speed while touching h once.
//
// Tiled path (most calls): tokens are cut into tiles spread over the intra-op threads, each thread running its
// own single-threaded GEMMs. For each tile, P_tile = h_tile V^T lands in an L2-resident buffer and is copied to
// P_out; the steered rows of the tile get delta = clamp(a + b P) - P, then D = delta V (fp32, a block of columns
// at a time), and only those rows of h are rewritten, each element once, as round(h + D) while the block of D is
// still in cache. Unsteered rows are read by the first GEMM and never stored to. When only a few vectors have a
// nonzero delta (the patch steering a few of the K it monitors, in one call), D is instead combined from those
// vectors' rows of V alone (the listed update, below), so V is read once, packed, for the projection. Three GEMM
// engines, chosen per call in this order:
//
// * AmxEngine: 16-bit h on CPUs with AMX-BF16, on a hand-written AMX kernel. AMX multiplies bf16 pairs exactly
//   and accumulates in fp32, so an fp32-accurate product only needs operands that are exact sums of bf16 values:
//   a bf16 value is one term; an fp16 value (11-bit significand) is exactly hi + lo with hi = bf16(x),
//   lo = x - hi; the fp32 delta is hi + lo up to 2^-16 relative, far below the final rounding to 16 bits. Each
//   GEMM sums the cross products of the terms into the same accumulators, dropping lo*lo (2^-18 relative).
// * Bf16DotEngine: bf16 h with an even d on CPUs with AVX512_BF16 but no AMX (Zen 4): the projection GEMM runs
//   VDPBF16PS on bf16 h and bf16 V (exact products, fp32 accumulation); the steering GEMM stays fp32.
// * F32Engine: fp32 operands and accumulation, on ATen's brgemm micro-kernel (oneDNN). Used for fp32 h, and for
//   16-bit h that neither engine above takes (the tile is widened to fp32 first). A one-token tile's projection
//   runs a row GEMV over the packed V^T instead (project_row_avx512, on AVX-512 CPUs).
//
// The engines read V re-laid out (transposed, packed); that packing is made once per V and cached
// (pack_cache.h), so the tiled path also serves decoding. Direct path (few tokens, V not cacheable): packing V
// on every call costs more than the whole op for a handful of tokens, so this path reads V in place with vector
// loops.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "checks.h"
#include "pack_cache.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define EMOKERN_X86_AVX512 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define EMOKERN_X86_AVX512 0
#endif

namespace emokern {
namespace {

using at::BFloat16;
using at::Half;
namespace cpublas = at::native::cpublas;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Sizes, tuned on Sapphire Rapids (48 KB L1d, 2 MB L2 per core) at d = 576 and 2048, K = 171. Tiles: tall
// enough to amortise each pass over the B operands, short enough that a tile's buffers stay in L2. Column
// blocks of D: small enough to still be in L1/L2 when written back into h.
constexpr int64_t kDirectMaxTokens = 16;  // at and below, the direct path beat the tiled ones that re-lay out V
constexpr int64_t kAmxColBlock = 128;
constexpr int64_t kF32ColBlock = 128;
// d per step of the fp32 projection GEMM. Measured at N = 8192, d = 4096, K = 171 (ablate / monitor): 1.20x / 1.27x
// over unfused PyTorch with 256, 1.35x / 1.30x with 512, 1.35x / 1.18x with 1024; the whole of d at once gave
// 0.61x / 0.38x.
constexpr int64_t kF32ReduceChunk = 512;
// At most 128 rows, and about 1 MB of tile operand: the fp32 tile for fp32 h, the bf16 terms of it for AMX.
int64_t tile_rows_for(int64_t row_bytes, int64_t multiple) {
  return std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(row_bytes, 1) / multiple * multiple, multiple, 128);
}

// Follows ATen's own choice (which honours ATEN_CPU_CAPABILITY), so the portable code can be exercised on any
// machine and the extension never uses an ISA that PyTorch was told to avoid.
bool cpu_has_avx512() {
#if EMOKERN_X86_AVX512
  static const bool has = at::get_cpu_capability() == "AVX512";
  return has;
#else
  return false;
#endif
}

// AVX2 with FMA and F16C (x86 CPUs without AVX-512: AMD before Zen 4, most client Intel parts). Also from ATen's
// choice, so ATEN_CPU_CAPABILITY=default still selects the portable code.
bool cpu_has_avx2() {
#if EMOKERN_X86_AVX512
  static const bool has = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return has;
#else
  return false;
#endif
}

// AVX512_BF16 (VDPBF16PS: pairs of bf16 products summed into fp32 lanes): Zen 4, Cooper Lake and later Intel.
bool cpu_has_avx512_bf16() {
#if EMOKERN_X86_AVX512
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return cpu_has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
  }();
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------------------------------------
// Portable row kernels. The extension is compiled for the baseline ISA, so the AVX-512 versions further down are
// picked at run time (a conversion loop over c10::Half compiled for the baseline costs more than the AMX GEMM it
// feeds).

// Clamp as max(lo, .) then min(hi, .) with the operand order of x86 max/min, so that both versions agree: a NaN
// projection stays NaN (and so does the row it steers), as in the reference.
inline float steer_one(float p, float a, float b, float lo, float hi) {
  float q = a + b * p;
  q = lo > q ? lo : q;
  q = hi < q ? hi : q;
  return q - p;
}

void steer_row_scalar(const float* p, const float* a, const float* b, const float* lo, const float* hi, int64_t K,
                      float* delta) {
  for (int64_t k = 0; k < K; ++k) delta[k] = steer_one(p[k], a[k], b[k], lo[k], hi[k]);
}

template <typename T>
void add_row_scalar(T* h, const float* D, int64_t d) {
  for (int64_t j = 0; j < d; ++j) h[j] = static_cast<T>(static_cast<float>(h[j]) + D[j]);
}

template <typename T>
void widen_row_scalar(const T* x, int64_t d, float* out) {
  for (int64_t j = 0; j < d; ++j) out[j] = static_cast<float>(x[j]);
}

// out[r * ldo] = x_r . y for the rows x_r = x + r * ldx, r < rows.
template <typename T>
void dot_rows_scalar(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t d, float* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0.0f;
    for (int64_t j = 0; j < d; ++j) acc += static_cast<float>(x[r * ldx + j]) * static_cast<float>(y[j]);
    out[r * ldo] = acc;
  }
}

// acc[0:cols] = sum_k coef[k] * V[row_k, 0:cols] over k < K, with row_k = rows[k] (rows == nullptr: row_k = k) and V
// rows ldv apart. The listed form serves the sparse update, which combines only the vectors with a nonzero delta.
inline int64_t listed_row(const int64_t* rows, int64_t k) { return rows ? rows[k] : k; }

template <typename T>
void combine_rows_scalar(const float* coef, const T* V, int64_t ldv, int64_t K, int64_t cols, float* acc,
                         const int64_t* rows) {
  std::fill(acc, acc + cols, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const T* v = V + listed_row(rows, k) * ldv;
    for (int64_t j = 0; j < cols; ++j) acc[j] += coef[k] * static_cast<float>(v[j]);
  }
}

// ------------------------------------------------------------------------------------------------------------
// AVX-512 row kernels. Tails use masked loads and stores, which never touch memory outside the mask.
#if EMOKERN_X86_AVX512
// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which -Wall reports at every
// inlined use as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EMOKERN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

EMOKERN_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
EMOKERN_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
EMOKERN_AVX512 inline __m512 bf16_bits_to_f32(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
EMOKERN_AVX512 inline __m512 load16(const BFloat16* p, __mmask16 m) {
  return bf16_bits_to_f32(_mm256_maskz_loadu_epi16(m, p));
}
EMOKERN_AVX512 inline __m512 load16(const Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
// Round to nearest even, NaN -> quiet NaN: the same bits as c10::BFloat16(float).
EMOKERN_AVX512 inline __m256i to_bf16_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
EMOKERN_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
EMOKERN_AVX512 inline void store16(BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bf16_bits(v));
}
EMOKERN_AVX512 inline void store16(Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

EMOKERN_AVX512 void steer_row_avx512(const float* p, const float* a, const float* b, const float* lo,
                                     const float* hi, int64_t K, float* delta) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(K - k);
    const __m512 pv = load16(p + k, m);
    __m512 q = _mm512_add_ps(load16(a + k, m), _mm512_mul_ps(load16(b + k, m), pv));
    q = _mm512_max_ps(load16(lo + k, m), q);
    q = _mm512_min_ps(load16(hi + k, m), q);
    store16(delta + k, _mm512_sub_ps(q, pv), m);
  }
}

template <typename T>
EMOKERN_AVX512 void add_row_avx512(T* h, const float* D, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    store16(h + j, _mm512_add_ps(load16(h + j, m), load16(D + j, m)), m);
  }
}

template <typename T>
EMOKERN_AVX512 void widen_row_avx512(const T* x, int64_t d, float* out) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    store16(out + j, load16(x + j, m), m);
  }
}

// Four rows per pass, so that each load of y feeds four FMAs.
template <typename T>
EMOKERN_AVX512 void dot_rows_avx512(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t d, float* out,
                                    int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - r0);
    const T* xr = x + r0 * ldx;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = tail_mask(d - j);
      const __m512 yv = load16(y + j, m);
      for (int64_t r = 0; r < 4; ++r)
        if (r < nr) acc[r] = _mm512_fmadd_ps(load16(xr + r * ldx + j, m), yv, acc[r]);
    }
    for (int64_t r = 0; r < nr; ++r) out[(r0 + r) * ldo] = _mm512_reduce_add_ps(acc[r]);
  }
}

// cols <= 64: the 64-column accumulator lives in four registers across the whole k loop.
template <typename T>
EMOKERN_AVX512 void combine_rows_avx512(const float* coef, const T* V, int64_t ldv, int64_t K, int64_t cols,
                                        float* acc, const int64_t* rows) {
  const __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16), m2 = tail_mask(cols - 32),
                  m3 = tail_mask(cols - 48);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const T* v = V + listed_row(rows, k) * ldv;
    const __m512 c = _mm512_set1_ps(coef[k]);
    a0 = _mm512_fmadd_ps(c, load16(v, m0), a0);
    if (cols > 16) a1 = _mm512_fmadd_ps(c, load16(v + 16, m1), a1);
    if (cols > 32) a2 = _mm512_fmadd_ps(c, load16(v + 32, m2), a2);
    if (cols > 48) a3 = _mm512_fmadd_ps(c, load16(v + 48, m3), a3);
  }
  store16(acc, a0, m0);
  if (cols > 16) store16(acc + 16, a1, m1);
  if (cols > 32) store16(acc + 32, a2, m2);
  if (cols > 48) store16(acc + 48, a3, m3);
}

// Writes the bf16 terms of x[0:n] (term 0 = hi = bf16(x), term 1 = lo = bf16(x - hi)) into nseg segments of
// `width` elements, seg_stride apart: segment s receives term term_of_seg[s], zero-padded from n to width.
template <typename T>
EMOKERN_AVX512 void split_row_avx512(const T* x, int64_t n, int64_t width, int64_t seg_stride,
                                     const int* term_of_seg, int nseg, BFloat16* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = load16(x + j, m);
    const __m256i hi = to_bf16_bits(v);
    const __m256i lo = to_bf16_bits(_mm512_sub_ps(v, bf16_bits_to_f32(hi)));
    for (int s = 0; s < nseg; ++s) _mm256_mask_storeu_epi16(out + s * seg_stride + j, m, term_of_seg[s] ? lo : hi);
  }
  for (int s = 0; s < nseg; ++s) std::fill(out + s * seg_stride + n, out + s * seg_stride + width, BFloat16(0.0f));
}
#endif

// ------------------------------------------------------------------------------------------------------------
// AVX2 row kernels: eight lanes, for CPUs without AVX-512 (on those, the scalar loops above ran the decode path:
// a float dot product is not auto-vectorised, since that would reorder its sum). Full blocks of 8 are vectorised;
// the ragged tail goes through the scalar code, which rounds the same way (c10's conversions are round to
// nearest even, as are the vector ones here).
#if EMOKERN_X86_AVX512
#define EMOKERN_AVX2 __attribute__((target("avx2,fma,f16c")))

EMOKERN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EMOKERN_AVX2 inline __m256 load8(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
EMOKERN_AVX2 inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
EMOKERN_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// Round to nearest even, NaN -> quiet NaN: the same bits as c10::BFloat16(float) (and as to_bf16_bits above).
EMOKERN_AVX2 inline void store8(BFloat16* p, __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // r holds values < 2^16 in 32-bit lanes: pack them to 16 bits (packus works within 128-bit halves, so gather
  // the two halves' results into the low 128 bits afterwards)
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
EMOKERN_AVX2 inline void store8(Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
EMOKERN_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

EMOKERN_AVX2 void steer_row_avx2(const float* p, const float* a, const float* b, const float* lo, const float* hi,
                                 int64_t K, float* delta) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 pv = load8(p + k);
    __m256 q = _mm256_add_ps(load8(a + k), _mm256_mul_ps(load8(b + k), pv));  // a + b p, as the scalar code
    // max(lo, q) then min(hi, q): x86 returns the second operand when either is NaN, so a NaN q stays NaN
    q = _mm256_max_ps(load8(lo + k), q);
    q = _mm256_min_ps(load8(hi + k), q);
    store8(delta + k, _mm256_sub_ps(q, pv));
  }
  steer_row_scalar(p + K8, a + K8, b + K8, lo + K8, hi + K8, K - K8, delta + K8);
}

template <typename T>
EMOKERN_AVX2 void add_row_avx2(T* h, const float* D, int64_t d) {
  const int64_t d8 = d / 8 * 8;
  for (int64_t j = 0; j < d8; j += 8) store8(h + j, _mm256_add_ps(load8(h + j), load8(D + j)));
  add_row_scalar(h + d8, D + d8, d - d8);
}

template <typename T>
EMOKERN_AVX2 void widen_row_avx2(const T* x, int64_t d, float* out) {
  const int64_t d8 = d / 8 * 8;
  for (int64_t j = 0; j < d8; j += 8) store8(out + j, load8(x + j));
  widen_row_scalar(x + d8, d - d8, out + d8);
}

// Four rows per pass, each with two accumulators (alternate blocks of 8), so that each load of y feeds four FMAs
// and eight independent chains hide the FMA latency even for a single row (decoding: one token).
template <typename T>
EMOKERN_AVX2 void dot_rows_avx2(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t d, float* out,
                                int64_t ldo) {
  const int64_t d16 = d / 16 * 16, d8 = d / 8 * 8;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - r0);
    const T* xr = x + r0 * ldx;
    __m256 acc0[4], acc1[4];
    for (int r = 0; r < 4; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d16; j += 16) {
      const __m256 y0 = load8(y + j), y1 = load8(y + j + 8);
      for (int64_t r = 0; r < 4; ++r) {
        if (r < nr) {
          acc0[r] = _mm256_fmadd_ps(load8(xr + r * ldx + j), y0, acc0[r]);
          acc1[r] = _mm256_fmadd_ps(load8(xr + r * ldx + j + 8), y1, acc1[r]);
        }
      }
    }
    if (d8 > d16) {
      const __m256 y0 = load8(y + d16);
      for (int64_t r = 0; r < nr; ++r) acc0[r] = _mm256_fmadd_ps(load8(xr + r * ldx + d16), y0, acc0[r]);
    }
    for (int64_t r = 0; r < nr; ++r) {
      float tail = 0.0f;
      dot_rows_scalar(xr + r * ldx + d8, ldx, 1, y + d8, d - d8, &tail, 1);
      out[(r0 + r) * ldo] = hsum8(_mm256_add_ps(acc0[r], acc1[r])) + tail;
    }
  }
}

// cols <= 64: the accumulator (eight blocks of 8 columns) lives in registers across the whole k loop; ragged
// columns beyond the last full block are summed by the scalar code.
template <typename T>
EMOKERN_AVX2 void combine_rows_avx2(const float* coef, const T* V, int64_t ldv, int64_t K, int64_t cols,
                                    float* acc, const int64_t* rows) {
  const int64_t nb = cols / 8;
  __m256 a[8];
  for (int b = 0; b < 8; ++b) a[b] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const T* v = V + listed_row(rows, k) * ldv;
    const __m256 c = _mm256_set1_ps(coef[k]);
    for (int64_t b = 0; b < 8; ++b)
      if (b < nb) a[b] = _mm256_fmadd_ps(c, load8(v + 8 * b), a[b]);
  }
  for (int64_t b = 0; b < nb; ++b) store8(acc + 8 * b, a[b]);
  if (nb * 8 < cols) combine_rows_scalar(coef, V + nb * 8, ldv, K, cols - nb * 8, acc + nb * 8, rows);
}
#endif

// ------------------------------------------------------------------------------------------------------------
// Run-time choice between the versions of each row kernel.

void steer_row(const float* p, const float* a, const float* b, const float* lo, const float* hi, int64_t K,
               float* delta) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return steer_row_avx512(p, a, b, lo, hi, K, delta);
  if (cpu_has_avx2()) return steer_row_avx2(p, a, b, lo, hi, K, delta);
#endif
  steer_row_scalar(p, a, b, lo, hi, K, delta);
}

template <typename T>
void add_row(T* h, const float* D, int64_t d) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return add_row_avx512(h, D, d);
  if (cpu_has_avx2()) return add_row_avx2(h, D, d);
#endif
  add_row_scalar(h, D, d);
}

template <typename T>
void widen_row(const T* x, int64_t d, float* out) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return widen_row_avx512(x, d, out);
  if (cpu_has_avx2()) return widen_row_avx2(x, d, out);
#endif
  widen_row_scalar(x, d, out);
}

template <typename T>
void dot_rows(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t d, float* out, int64_t ldo) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return dot_rows_avx512(x, ldx, rows, y, d, out, ldo);
  if (cpu_has_avx2()) return dot_rows_avx2(x, ldx, rows, y, d, out, ldo);
#endif
  dot_rows_scalar(x, ldx, rows, y, d, out, ldo);
}

template <typename T>
void combine_rows(const float* coef, const T* V, int64_t ldv, int64_t K, int64_t cols, float* acc,
                  const int64_t* rows = nullptr) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return combine_rows_avx512(coef, V, ldv, K, cols, acc, rows);
  if (cpu_has_avx2()) return combine_rows_avx2(coef, V, ldv, K, cols, acc, rows);
#endif
  combine_rows_scalar(coef, V, ldv, K, cols, acc, rows);
}

// ------------------------------------------------------------------------------------------------------------
// Grow-only per-thread buffers. A fresh multi-megabyte allocation per call is paid as one page fault (and page
// clearing) per 4 KB, which measured as a third of the AMX path's time; these stay mapped, at the cost of keeping
// the largest size seen (a few MB per thread).
enum BufferSlot { kScratch = 0, kOperands = 1, kNumSlots = 2 };

void* thread_buffer(BufferSlot slot, int64_t bytes) {
  struct Buffer {
    void* p = nullptr;
    int64_t n = 0;
    ~Buffer() { c10::free_cpu(p); }
  };
  thread_local std::array<Buffer, kNumSlots> buffers;
  Buffer& b = buffers[slot];
  if (b.n < bytes) {
    c10::free_cpu(b.p);
    b.p = nullptr;
    b.n = 0;
    b.p = c10::alloc_cpu(bytes);  // 64-byte aligned; throws if out of memory
    b.n = bytes;
  }
  return b.p;
}

// ------------------------------------------------------------------------------------------------------------

struct Steering {
  const int32_t* row;  // nullptr: projection only
  const float *a, *b, *lo, *hi;
  int64_t K;
};

// delta of token n into out (K floats); false when the token is not steered.
bool steer_token(const Steering& st, int64_t n, const float* p, float* out) {
  const int32_t r = st.row ? st.row[n] : -1;
  if (r < 0) return false;
  const int64_t off = static_cast<int64_t>(r) * st.K;
  steer_row(p, st.a + off, st.b + off, st.lo + off, st.hi + off, st.K, out);
  return true;
}

// ------------------------------------------------------------------------------------------------------------
// The listed (sparse) update. A caller that steers a few of the K vectors passes tables whose other columns are
// the identity (a = 0, b = 1, lo = -inf, hi = +inf), and their delta is exactly 0: the update needs only the
// vectors with a nonzero delta, so it reads those rows of V (in h's dtype, in place) and not all of V. This is
// what makes monitoring onto all K and steering a few of them one call at decode: the projection reads the packed
// V once, the update reads S rows. A NaN delta (a non-finite projection) is nonzero, so it still reaches h, as in
// the reference.

// active[k] |= (delta[k] != 0) for k < K.
void mark_active(const float* delta, int64_t K, uint8_t* active) {
  for (int64_t k = 0; k < K; ++k) active[k] |= static_cast<uint8_t>(delta[k] != 0.0f);
}

// The steered rows' deltas on the active vectors only: coef is S x vectors.size(), row-major.
struct ListedDeltas {
  std::vector<int64_t> vectors;
  std::vector<float> coef;

  // delta_row(i): the K deltas of the i-th steered row.
  template <typename RowFn>
  void gather(const uint8_t* active, int64_t K, int64_t S, RowFn delta_row) {
    vectors.clear();
    for (int64_t k = 0; k < K; ++k)
      if (active[k]) vectors.push_back(k);
    const int64_t U = static_cast<int64_t>(vectors.size());
    coef.resize(S * U);
    for (int64_t i = 0; i < S; ++i) {
      const float* dl = delta_row(i);
      for (int64_t u = 0; u < U; ++u) coef[i * U + u] = dl[vectors[u]];
    }
  }
};

constexpr int64_t kListedBlock = 64;  // columns per combine_rows call (its register-resident accumulator)

// h[steered[i], c] = round(h + sum_u coef[i, u] V[vectors[u], c]) for the columns c in [c_begin, c_end), one block
// of 64 at a time: the few listed rows of V stay in L1 across the steered rows.
template <typename T>
void add_listed(T* h, int64_t ldh, const int64_t* steered, int64_t S, const ListedDeltas& L, const T* V, int64_t d,
                int64_t c_begin, int64_t c_end) {
  const int64_t U = static_cast<int64_t>(L.vectors.size());
  float acc[kListedBlock];
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kListedBlock) {
    const int64_t cols = std::min(kListedBlock, c_end - c0);
    for (int64_t i = 0; i < S; ++i) {
      combine_rows(L.coef.data() + i * U, V + c0, d, U, cols, acc, L.vectors.data());
      add_row(h + steered[i] * ldh + c0, acc, cols);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Direct path (few tokens). Three passes, each parallel: P (over vectors), delta (serial, N x K), then the
// update (over 64-column blocks of h, each block of every steered row combined from the active vectors and
// written back at once).

template <typename T>
void run_direct(const at::Tensor& h, const at::Tensor& V, const Steering& st, const at::Tensor& P_out) {
  const int64_t N = h.size(0), d = h.size(1), K = V.size(0);
  const int64_t ldh = h.stride(0), ldP = P_out.stride(0);
  const T* hc = h.const_data_ptr<T>();
  const T* v = V.const_data_ptr<T>();
  float* P = P_out.mutable_data_ptr<float>();

  // Grains of about 32k multiply-adds: below that, waking a second thread costs more than it saves.
  constexpr int64_t kGrainMacs = 1 << 15;
  at::parallel_for(0, K, std::max<int64_t>(1, kGrainMacs / (N * d)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      dot_rows(hc, ldh, N, v + k * d, d, P + k, ldP);
  });
  if (!st.row) return;

  std::vector<int64_t> steered;
  std::vector<float> delta(N * K);
  std::vector<uint8_t> active(K, 0);
  for (int64_t n = 0; n < N; ++n) {
    float* dl = delta.data() + steered.size() * K;
    if (!steer_token(st, n, P + n * ldP, dl)) continue;
    mark_active(dl, K, active.data());
    steered.push_back(n);
  }
  const int64_t S = static_cast<int64_t>(steered.size());
  ListedDeltas listed;
  listed.gather(active.data(), K, S, [&](int64_t i) { return delta.data() + i * K; });
  const int64_t U = static_cast<int64_t>(listed.vectors.size());
  if (U == 0) return;  // nothing steered, or every delta is exactly zero: h is unchanged

  T* hm = h.mutable_data_ptr<T>();
  const int64_t blocks = (d + kListedBlock - 1) / kListedBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainMacs / (S * U * kListedBlock)), [&](int64_t b0, int64_t b1) {
    add_listed(hm, ldh, steered.data(), S, listed, v, d, b0 * kListedBlock, std::min(d, b1 * kListedBlock));
  });
}

// ------------------------------------------------------------------------------------------------------------
// Tiled path.

struct TileArgs {
  int64_t n0, m;  // first token and token count of the tile
};

// out[i * ldo + j] = V[k0 + j, i] as fp32 for i in [i0, i1), j < cols_out (a multiple of 16), reading zeros
// for j >= rows. Works in 16 x 16 blocks so that the 16 source lines stay in L1 while each is read across.
template <typename T>
void transpose_widen_scalar(const T* V, int64_t d, int64_t i0, int64_t i1, int64_t k0, int64_t rows, int64_t ldo,
                            int64_t cols_out, float* out) {
  for (int64_t ib = i0; ib < i1; ib += 16) {
    const int64_t ie = std::min(i1, ib + 16);
    for (int64_t jb = 0; jb < cols_out; jb += 16)
      for (int64_t i = ib; i < ie; ++i)
        for (int64_t j = jb; j < jb + 16; ++j) out[i * ldo + j] = j < rows ? static_cast<float>(V[(k0 + j) * d + i]) : 0.0f;
  }
}

#if EMOKERN_X86_AVX512
// In-register transpose of a 16 x 16 fp32 block: 32-bit, then 64-bit interleaves within 128-bit lanes, then two
// rounds of 128-bit lane shuffles.
EMOKERN_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  __m512 u[16];
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 2]), e = _mm512_castps_pd(t[4 * k + 3]);
    u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  // u[4k + e] holds, in 128-bit lane L, column 4L + e of rows 4k .. 4k + 3.
  for (int e = 0; e < 4; ++e) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

template <typename T>
EMOKERN_AVX512 void transpose_widen_avx512(const T* V, int64_t d, int64_t i0, int64_t i1, int64_t k0, int64_t rows,
                                           int64_t ldo, int64_t cols_out, float* out) {
  __m512 r[16];
  for (int64_t ib = i0; ib < i1; ib += 16) {
    const int64_t ni = std::min<int64_t>(16, i1 - ib);
    const __mmask16 mi = tail_mask(ni);
    for (int64_t jb = 0; jb < cols_out; jb += 16) {
      for (int64_t j = 0; j < 16; ++j)
        r[j] = jb + j < rows ? load16(V + (k0 + jb + j) * d + ib, mi) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int64_t i = 0; i < ni; ++i) _mm512_storeu_ps(out + (ib + i) * ldo + jb, r[i]);
    }
  }
}
#endif

template <typename T>
void transpose_widen(const T* V, int64_t d, int64_t i0, int64_t i1, int64_t k0, int64_t rows, int64_t ldo,
                     int64_t cols_out, float* out) {
#if EMOKERN_X86_AVX512
  if (cpu_has_avx512()) return transpose_widen_avx512(V, d, i0, i1, k0, rows, ldo, cols_out, out);
#endif
  transpose_widen_scalar(V, d, i0, i1, k0, rows, ldo, cols_out, out);
}

// V widened to fp32 (K x d), the B operand of the steering GEMM for 16-bit V, from the cache of packed operands.
template <typename T>
at::Tensor widened_vectors(const at::Tensor& V) {
  const T* v = V.const_data_ptr<T>();
  const int64_t K = V.size(0), d = V.size(1);
  return cpu::packed_operand(V, cpu::PackKind::kWidenedF32, K * d * 4, [&](void* buf) {
    float* v32 = static_cast<float*>(buf);
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) widen_row(v + k * d, d, v32 + k * d);
    });
  });
}

// ------------------------------------------------------------------------------------------------------------
// One-token projection (fp32, AVX-512): P[0:ldp] = a[0:d] . Vt, Vt the packed d x ldp transpose. Decoding one
// token, V^T comes from memory (the model's weights stream past between calls) and the op waits on it. oneDNN's
// brgemm walks it in 64-column panels, a strided read; this kernel reads it row after row, up to 12 x 16 columns
// (all of them for K <= 192) accumulated in registers, so the read is sequential. Measured with V^T evicted between
// calls (30 different V, 24 MB read in between, thread CPU time): 1.2x at d = 576 and 1.5x at d = 2048 over
// brgemm. At 4 and 16 tokens a register-blocked version of it was slower than brgemm (V^T is then reused from
// cache and brgemm's blocking wins), so it serves one token only.
#if EMOKERN_X86_AVX512
constexpr int kRowGemvMaxBlocks = 12;  // 12 accumulators + 12 loads + 1 broadcast fit the 32 registers
constexpr int64_t kRowGemvChunk = 32;  // rows of Vt per pass when the columns take several passes (stays in L1)

// P[0:16 NC] (+)= a[0:L] . B[0:L, 0:16 NC], B rows ldb apart.
template <int NC>
EMOKERN_AVX512 void row_gemv_block(const float* a, const float* B, int64_t ldb, int64_t L, float* P, bool add) {
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = add ? _mm512_loadu_ps(P + 16 * c) : _mm512_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    const __m512 x = _mm512_set1_ps(a[l]);
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(x, _mm512_loadu_ps(B + l * ldb + 16 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(P + 16 * c, acc[c]);
}

// The columns [0, 16 nc) in blocks of at most kRowGemvMaxBlocks x 16 columns.
template <int NC = kRowGemvMaxBlocks>
EMOKERN_AVX512 void row_gemv_cols(const float* a, const float* B, int64_t ldb, int64_t L, int64_t nc, float* P,
                                  bool add) {
  if constexpr (NC >= 1) {
    int64_t c = 0;
    for (; c + NC <= nc; c += NC) row_gemv_block<NC>(a, B + 16 * c, ldb, L, P + 16 * c, add);
    if (c < nc) row_gemv_cols<NC - 1>(a, B + 16 * c, ldb, L, nc - c, P + 16 * c, add);
  }
}

// P[0:ldp] = a . Vt (ldp a multiple of 16): in one sweep over d when the columns fit the registers, else in chunks
// of kRowGemvChunk rows that every column block passes over while they are in L1.
EMOKERN_AVX512 void project_row_avx512(const float* a, const float* Vt, int64_t d, int64_t ldp, float* P) {
  const int64_t nc = ldp / 16;
  const int64_t chunk = nc <= kRowGemvMaxBlocks ? d : kRowGemvChunk;
  for (int64_t l0 = 0; l0 < d; l0 += chunk)
    row_gemv_cols(a + l0, Vt + l0 * ldp, ldp, std::min(chunk, d - l0), nc, P, /*add=*/l0 > 0);
}
#endif

// The steering half of the engines whose second GEMM is fp32 (F32Engine, Bf16DotEngine): delta rows (fp32, row
// stride ldp) times V32, a block of columns at a time. The engines set the fields; Scratch is theirs (P, delta, D).
struct F32Update {
  int64_t d, K;
  int64_t ldp;        // row stride of P and delta; also the column count of the first GEMM
  int64_t col_block;  // columns of D computed (and written back) at a time
  at::Tensor V;       // the caller's (K, d) vectors

  // The dense update's B operand, K x d fp32: V itself, or V widened (from the cache of packed operands). Made on
  // first use, by whichever thread needs it first: the listed update (a few steered vectors, every decode step of
  // the patch) never does, so a 16-bit V is then never held in fp32.
  void prepare_dense() const {
    std::call_once(v32_once_, [&] {
      switch (V.scalar_type()) {
        case at::kHalf: V32_hold_ = widened_vectors<Half>(V); break;
        case at::kBFloat16: V32_hold_ = widened_vectors<BFloat16>(V); break;
        default: V32_hold_ = V; break;
      }
      V32_ = static_cast<const float*>(V32_hold_.const_data_ptr());
    });
  }

  template <typename S>
  const float* P_row(const S& s, int64_t i) const { return s.P + i * ldp; }
  template <typename S>
  float* delta_row(const S& s, int64_t i) const { return s.delta + i * ldp; }
  template <typename S>
  void pack_delta_row(const S&, int64_t) const {}

  // D[:, c0:c0+cols] of the S steered rows, as an S x cols block with row stride col_block.
  template <typename S>
  void update(const S& s, int64_t n, int64_t c0, int64_t cols) const {
    cpublas::brgemm(n, cols, K, ldp, d, col_block, /*add_C=*/false, s.delta, V32_ + c0, s.D);
  }
  template <typename S>
  const float* D_row(const S& s, int64_t i) const { return s.D + i * col_block; }

  void begin_thread() const {}
  void finish_thread() const {}

 private:
  mutable std::once_flag v32_once_;
  mutable at::Tensor V32_hold_;
  mutable const float* V32_ = nullptr;
};

// fp32 engine: P = A V^T with B = V^T (d x ldp, prepared once per call), D = delta V with B = V (K x d).
template <typename T>
struct F32Engine : F32Update {
  static constexpr bool kWiden = !std::is_same_v<T, float>;

  const T* h;
  int64_t ldh;
  int64_t ldw;       // row stride of the widened tile
  const float* Vt;   // d x ldp
  int64_t tile_rows;

  at::Tensor Vt_hold;  // keeps the packed operand alive for the call

  F32Engine(const at::Tensor& h_, const at::Tensor& V, int64_t tile)
      : h(h_.const_data_ptr<T>()), ldh(h_.stride(0)), tile_rows(tile) {
    d = h_.size(1);
    K = V.size(0);
    ldw = round_up(d, 16);
    // A column count that is a multiple of the 16-lane vector width (zero-padded) made the first GEMM 15-20%
    // faster than the ragged one.
    ldp = round_up(K, 16);
    col_block = std::min<int64_t>(kF32ColBlock, ldw);
    this->V = V;
    const T* v = V.const_data_ptr<T>();
    const int64_t d_ = d, K_ = K, ldp_ = ldp;
    Vt_hold = cpu::packed_operand(V, cpu::PackKind::kTransposedF32, d * ldp * 4, [&](void* buf) {
      float* vt = static_cast<float*>(buf);
      at::parallel_for(0, (d_ + 15) / 16, 4, [&](int64_t b0, int64_t b1) {
        transpose_widen(v, d_, b0 * 16, std::min(d_, b1 * 16), 0, K_, ldp_, ldp_, vt);
      });
    });
    Vt = static_cast<const float*>(Vt_hold.const_data_ptr());
  }

  // Per-thread scratch, in floats: [A (widened tile)] P, delta, D.
  int64_t scratch_bytes() const {
    return tile_rows * ((kWiden ? ldw : 0) + 2 * ldp + col_block) * static_cast<int64_t>(sizeof(float));
  }

  struct Scratch {
    float *A, *P, *delta, *D;
  };
  Scratch carve(void* base) const {
    float* f = static_cast<float*>(base);
    Scratch s;
    s.A = f;
    f += kWiden ? tile_rows * ldw : 0;
    s.P = f;
    f += tile_rows * ldp;
    s.delta = f;
    f += tile_rows * ldp;
    s.D = f;
    return s;
  }

  void project(const Scratch& s, const TileArgs& t) const {
    const float* A;
    int64_t lda;
    if constexpr (kWiden) {
      for (int64_t i = 0; i < t.m; ++i) widen_row(h + (t.n0 + i) * ldh, d, s.A + i * ldw);
      A = s.A;
      lda = ldw;
    } else {
      A = h + t.n0 * ldh;
      lda = ldh;
    }
    // The reduction over d runs in chunks: with the whole of d at once, the tile (up to 1 MB) and the panels of Vt
    // streaming past it (d x 64 floats each, 1 MB at d = 4096) overflow L2, and the tile was re-read from L3 for
    // every panel. A chunk of both stays in L2.
#if EMOKERN_X86_AVX512
    if (t.m == 1 && cpu_has_avx512()) return project_row_avx512(A, Vt, d, ldp, s.P);
#endif
    const int64_t chunk = d > 2 * kF32ReduceChunk ? kF32ReduceChunk : d;  // up to d = 1024 both fit whole
    for (int64_t c0 = 0; c0 < d; c0 += chunk) {
      const int64_t dc = std::min(chunk, d - c0);
      cpublas::brgemm(t.m, ldp, dc, lda, ldp, ldp, /*add_C=*/c0 > 0, A + c0, Vt + c0 * ldp, s.P);
    }
  }

};

// AMX engine (bf16 / fp16 h), on a hand-written AMX micro-kernel: oneDNN's brgemm ukernel, as exposed by
// ATen, ran these shapes at about a sixth of the TDPBF16PS peak measured on the same core.
#if EMOKERN_X86_AVX512
#define EMOKERN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")))

// Linux hands out the AMX register state only to processes that ask for it.
bool amx_permitted() {
#if defined(__linux__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Every tile is 16 rows x 64 bytes: C in tiles 0-3 (a 32 x 32 fp32 block), A in 4-5, B in 6-7.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

EMOKERN_AMX void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not treat the operand of ldtilecfg as read and drops the stores above without this barrier.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
EMOKERN_AMX void amx_release() { _tile_release(); }

// B operands are packed as panels of 16 columns; a panel holds Kr/2 rows of 16 (even, odd) reduction-index pairs
// (the VNNI layout TDPBF16PS reads), so element (k, n) sits at n/16 * Kr*16 + k/2 * 32 + n%16 * 2 + k%2.
//
// C[0:M, 0:N] (fp32, row stride ldc) = sum over pairs p of A[:, a_off[p] : a_off[p] + L] . B[b_off[p] : + L, :],
// A bf16 with row stride lda, B packed with total reduction length Kr. M, N and L multiples of 32.
struct Pairs {
  int n;
  int64_t a_off[3], b_off[3];
};

EMOKERN_AMX void amx_gemm(int64_t M, int64_t N, int64_t L, const Pairs& pairs, const BFloat16* A, int64_t lda,
                          const BFloat16* B, int64_t Kr, float* C, int64_t ldc) {
  const int64_t sa = lda * static_cast<int64_t>(sizeof(BFloat16)), sc = ldc * static_cast<int64_t>(sizeof(float));
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int p = 0; p < pairs.n; ++p) {
        const BFloat16* a0 = A + m0 * lda + pairs.a_off[p];
        const BFloat16* a1 = a0 + 16 * lda;
        const BFloat16* b0 = B + n0 * Kr + pairs.b_off[p] * 16;
        const BFloat16* b1 = b0 + 16 * Kr;
        for (int64_t k = 0; k < L; k += 32) {
          _tile_loadd(4, a0 + k, sa);
          _tile_loadd(5, a1 + k, sa);
          _tile_loadd(6, b0 + k * 16, 64);
          _tile_loadd(7, b1 + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* c = C + m0 * ldc + n0;
      _tile_stored(0, c, sc);
      _tile_stored(1, c + 16, sc);
      _tile_stored(2, c + 16 * ldc, sc);
      _tile_stored(3, c + 16 * ldc + 16, sc);
    }
  }
}

// Term `term` (0: hi, 1: lo) of 16 fp32 values as bf16 bits.
EMOKERN_AVX512 inline __m256i term_bits(__m512 v, int term) {
  const __m256i hi = to_bf16_bits(v);
  return term == 0 ? hi : to_bf16_bits(_mm512_sub_ps(v, bf16_bits_to_f32(hi)));
}
// 16 VNNI pairs (even[n], odd[n]) = one 64-byte row of a packed panel.
EMOKERN_AVX512 inline void store_pairs(BFloat16* out, __m256i even, __m256i odd) {
  _mm512_storeu_si512(out, _mm512_or_si512(_mm512_cvtepu16_epi32(even),
                                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16)));
}

// B[k, n] = term of X[k, n] for k < rows, n < cols (X row-major, row stride ldx), zero elsewhere; one segment
// of `seg_len` reduction indices starting at k_off, all N panels (N = cols rounded up to 32).
template <typename T>
EMOKERN_AVX512 void pack_rows(const T* X, int64_t ldx, int64_t rows, int64_t cols, int term, int64_t seg_len,
                              int64_t k_off, int64_t Kr, BFloat16* B) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t n0 = 0; n0 < round_up(cols, 32); n0 += 16) {
    const __mmask16 m = n0 < cols ? tail_mask(cols - n0) : static_cast<__mmask16>(0);
    BFloat16* panel = B + n0 * Kr + k_off * 16;
    for (int64_t k = 0; k < seg_len; k += 2) {
      const __m512 e = k < rows ? load16(X + k * ldx + n0, m) : zero;
      const __m512 o = k + 1 < rows ? load16(X + (k + 1) * ldx + n0, m) : zero;
      store_pairs(panel + k * 16, term_bits(e, term), term_bits(o, term));
    }
  }
}

// B[k, n] = term of X[n, k] for k < rows (d), n < cols (vectors), zero elsewhere: pack_rows of X^T, transposing
// 16 x 16 blocks in registers on the way.
template <typename T>
EMOKERN_AVX512 void pack_cols(const T* X, int64_t ldx, int64_t rows, int64_t cols, int term, int64_t seg_len,
                              int64_t k_off, int64_t Kr, BFloat16* B) {
  __m512 r[16];
  for (int64_t n0 = 0; n0 < round_up(cols, 32); n0 += 16) {
    BFloat16* panel = B + n0 * Kr + k_off * 16;
    for (int64_t k0 = 0; k0 < seg_len; k0 += 16) {
      const __mmask16 m = k0 < rows ? tail_mask(rows - k0) : static_cast<__mmask16>(0);
      for (int64_t n = 0; n < 16; ++n) r[n] = n0 + n < cols ? load16(X + (n0 + n) * ldx + k0, m) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int64_t k = 0; k < 16; k += 2)
        store_pairs(panel + (k0 + k) * 16, term_bits(r[k], term), term_bits(r[k + 1], term));
    }
  }
}

// bf16 engine for CPUs with AVX512_BF16 but no AMX (Zen 4): the projection GEMM multiplies bf16 h by bf16 V with
// VDPBF16PS, which forms each bf16 x bf16 product exactly and accumulates in fp32 (inputs and outputs that are
// fp32 denormals are flushed to zero), at twice the multiply-adds per instruction of the fp32 engine and with no
// widening pass over h. The steering GEMM (fp32 delta times V) stays fp32, as in F32Engine.
#define EMOKERN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// C[0:MR, 0:64] = A[0:MR, 0:2*pairs] . B for one 64-column block: B is four VNNI panels (panel_stride apart) of
// 16 columns, each a run of 64-byte rows of 16 (even, odd) reduction-index pairs; A is bf16, row stride lda.
// MR x 4 accumulators + 4 B rows + 1 broadcast fit the 32 vector registers for MR <= 6.
template <int MR>
EMOKERN_AVX512_BF16 void dpbf16_block(const BFloat16* A, int64_t lda, const BFloat16* B, int64_t panel_stride,
                                      int64_t pairs, float* C, int64_t ldc) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[4];
    for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(B + j * panel_stride + p * 32);
    for (int r = 0; r < MR; ++r) {
      int32_t bits;
      std::memcpy(&bits, A + r * lda + 2 * p, sizeof(bits));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(bits);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(C + r * ldc + 16 * j, acc[r][j]);
}

EMOKERN_AVX512_BF16 void dpbf16_rows(int64_t m, const BFloat16* A, int64_t lda, const BFloat16* B,
                                     int64_t panel_stride, int64_t pairs, float* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) dpbf16_block<6>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
  switch (m - r) {
    case 5: return dpbf16_block<5>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
    case 4: return dpbf16_block<4>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
    case 3: return dpbf16_block<3>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
    case 2: return dpbf16_block<2>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
    case 1: return dpbf16_block<1>(A + r * lda, lda, B, panel_stride, pairs, C + r * ldc, ldc);
    default: return;
  }
}

struct Bf16DotEngine : F32Update {
  // Only for bf16 h with an even d: the A operand is read from h in pairs, and an odd d would read past a row.
  static bool usable(const at::Tensor& h) { return cpu_has_avx512_bf16() && h.size(1) % 2 == 0; }

  const BFloat16* h;
  int64_t ldh;
  int64_t Kr;         // reduction length of the packed panels (d rounded up to 16, zero-padded); ldp: a multiple of 64
  const BFloat16* B;  // V^T in VNNI panels: element (k, n) at n/16 * Kr*16 + k/2 * 32 + n%16 * 2 + k%2
  int64_t tile_rows;
  at::Tensor B_hold;

  Bf16DotEngine(const at::Tensor& h_, const at::Tensor& V, int64_t tile)
      : h(h_.const_data_ptr<BFloat16>()), ldh(h_.stride(0)), tile_rows(tile) {
    d = h_.size(1);
    K = V.size(0);
    Kr = round_up(d, 16);
    ldp = round_up(K, 64);
    col_block = std::min<int64_t>(kF32ColBlock, round_up(d, 16));
    this->V = V;
    const BFloat16* v = V.const_data_ptr<BFloat16>();
    const int64_t d_ = d, K_ = K, Kr_ = Kr, ldp_ = ldp;
    B_hold = cpu::packed_operand(V, cpu::PackKind::kVnniBf16, ldp * Kr * 2, [&](void* buf) {
      BFloat16* b = static_cast<BFloat16*>(buf);
      // Panels of the 32-column slices pack_cols writes, then zero panels up to the 64-column multiple.
      const int64_t slices = round_up(K_, 32) / 32;
      at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t sl = s0; sl < s1; ++sl)
          pack_cols(v + sl * 32 * d_, d_, d_, std::min<int64_t>(32, K_ - sl * 32), 0, Kr_, 0, Kr_,
                    b + sl * 32 * Kr_);
      });
      std::fill(b + slices * 32 * Kr_, b + ldp_ * Kr_, BFloat16(0.0f));
    });
    B = static_cast<const BFloat16*>(B_hold.const_data_ptr());
  }

  int64_t scratch_bytes() const { return tile_rows * (2 * ldp + col_block) * static_cast<int64_t>(sizeof(float)); }

  struct Scratch {
    float *P, *delta, *D;
  };
  Scratch carve(void* base) const {
    float* f = static_cast<float*>(base);
    return Scratch{f, f + tile_rows * ldp, f + 2 * tile_rows * ldp};
  }

  void project(const Scratch& s, const TileArgs& t) const {
    // Column blocks outside, rows inside: a 64-column block of B (4 panels, Kr * 128 bytes) stays in L1/L2 while
    // every row of the tile streams past it.
    for (int64_t n0 = 0; n0 < ldp; n0 += 64)
      dpbf16_rows(t.m, h + t.n0 * ldh, ldh, B + n0 * Kr, Kr * 16, d / 2, s.P + n0, ldp);
  }

};

template <typename T>
struct AmxEngine {
  // bf16 terms per value: one for bf16, two (hi, lo) for fp16 and for the fp32 delta. Products kept, as (term of
  // the A operand, term of V): all of them for bf16, all but lo*lo for fp16. The A operand is h in the first GEMM
  // and delta in the second.
  static constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
  static constexpr int kTermsV = kBf16 ? 1 : 2;
  static constexpr std::array<int, 2> kTerms = {0, 1};

  const T* h;
  int64_t ldh, d, K;
  int64_t d32, K32;    // segment lengths of the two reductions (AMX reduces 32 bf16 at a time)
  int64_t lda1, lda2;  // row strides of the A operands: terms x segment length
  int64_t ldp;         // row stride of P = columns of the first GEMM
  int64_t col_block;   // columns of D computed (and written back) at a time, a multiple of 32
  Pairs pairs1, pairs2;
  BFloat16 *B1, *B2;   // packed [V terms]^T (d32 x K32 per term) and [V terms] (K32 x d32 per term)
  int64_t tile_rows;   // a multiple of 32

  static Pairs make_pairs(int terms_a, int64_t len) {
    Pairs p{0, {}, {}};
    auto add = [&](int ta, int tv) {
      p.a_off[p.n] = ta * len;
      p.b_off[p.n] = tv * len;
      ++p.n;
    };
    add(0, 0);
    if (terms_a > 1) add(1, 0);
    if (kTermsV > 1) add(0, 1);
    return p;
  }

  AmxEngine(const at::Tensor& h_, const at::Tensor& V, int64_t tile)
      : h(h_.const_data_ptr<T>()), ldh(h_.stride(0)), d(h_.size(1)), K(V.size(0)), tile_rows(tile) {
    d32 = round_up(d, 32);
    K32 = round_up(K, 32);
    lda1 = kTermsV * d32;
    lda2 = 2 * K32;
    ldp = K32;
    col_block = std::min<int64_t>(kAmxColBlock, d32);
    pairs1 = make_pairs(kTermsV, d32);
    pairs2 = make_pairs(2, K32);
    const T* v = V.const_data_ptr<T>();
    B1 = static_cast<BFloat16*>(thread_buffer(kOperands, 2 * kTermsV * d32 * K32 * 2));
    B2 = B1 + kTermsV * d32 * K32;
    BFloat16* b1 = B1;
    BFloat16* b2 = B2;
    const int64_t rd1 = kTermsV * d32, rd2 = kTermsV * K32;
    // One task per (term, 32-column slice of B): the packers write whole panels, so tasks never overlap.
    const int64_t t1 = kTermsV * (K32 / 32), t2 = kTermsV * (d32 / 32);
    at::parallel_for(0, t1 + t2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (t < t1) {
          const int term = static_cast<int>(t / (K32 / 32));
          const int64_t n0 = t % (K32 / 32) * 32;
          pack_cols(v + n0 * d, d, d, std::min<int64_t>(32, K - n0), term, d32, term * d32, rd1, b1 + n0 * rd1);
        } else {
          const int term = static_cast<int>((t - t1) / (d32 / 32));
          const int64_t n0 = (t - t1) % (d32 / 32) * 32;
          pack_rows(v + n0, d, K, std::min<int64_t>(32, d - n0), term, K32, term * K32, rd2, b2 + n0 * rd2);
        }
      }
    });
  }

  // Per-thread scratch: P, D, the delta rows (fp32, each a multiple of 64 bytes so that the parts stay aligned),
  // then the bf16 A operands of the second and first GEMMs.
  int64_t ldd() const { return round_up(K, 16); }
  int64_t scratch_bytes() const {
    return tile_rows * (ldp + col_block + ldd()) * 4 + tile_rows * (lda2 + lda1) * 2;
  }

  struct Scratch {
    BFloat16 *A1, *A2;
    float *P, *delta, *D;
  };
  Scratch carve(void* base) const {
    float* f = static_cast<float*>(base);
    Scratch s;
    s.P = f;
    f += tile_rows * ldp;
    s.D = f;
    f += tile_rows * col_block;
    s.delta = f;
    f += tile_rows * ldd();
    s.A2 = reinterpret_cast<BFloat16*>(f);
    s.A1 = s.A2 + tile_rows * lda2;
    return s;
  }

  void begin_thread() const { amx_configure(); }

  void project(const Scratch& s, const TileArgs& t) const {
    const int64_t m32 = round_up(t.m, 32);
    if (kBf16 && d == d32 && t.m == m32) {
      // bf16 h already is the A operand: read in place (staging it measured 20-25% slower at d = 2048).
      amx_gemm(m32, ldp, d32, pairs1, reinterpret_cast<const BFloat16*>(h) + t.n0 * ldh, ldh, B1, d32, s.P, ldp);
      return;
    }
    for (int64_t i = 0; i < t.m; ++i)
      split_row_avx512(h + (t.n0 + i) * ldh, d, d32, d32, kTerms.data(), kTermsV, s.A1 + i * lda1);
    std::fill(s.A1 + t.m * lda1, s.A1 + m32 * lda1, BFloat16(0.0f));
    amx_gemm(m32, ldp, d32, pairs1, s.A1, lda1, B1, kTermsV * d32, s.P, ldp);
  }

  const float* P_row(const Scratch& s, int64_t i) const { return s.P + i * ldp; }
  float* delta_row(const Scratch& s, int64_t i) const { return s.delta + i * ldd(); }
  // The dense update's A operand: delta row i split into its bf16 terms.
  void pack_delta_row(const Scratch& s, int64_t i) const {
    split_row_avx512(delta_row(s, i), K, K32, K32, kTerms.data(), 2, s.A2 + i * lda2);
  }
  void prepare_dense() const {}

  void update(const Scratch& s, int64_t S, int64_t c0, int64_t cols) const {
    const int64_t S32 = round_up(S, 32);
    if (c0 == 0) std::fill(s.A2 + S * lda2, s.A2 + S32 * lda2, BFloat16(0.0f));
    amx_gemm(S32, round_up(cols, 32), K32, pairs2, s.A2, lda2, B2 + c0 * kTermsV * K32, kTermsV * K32, s.D,
             col_block);
  }
  const float* D_row(const Scratch& s, int64_t i) const { return s.D + i * col_block; }

  void finish_thread() const { amx_release(); }
};
#endif

// Each thread owns one contiguous range of tiles (at::parallel_for hands out one chunk per thread): as many tiles
// of the preferred height as it takes, rounded up to a multiple of the thread count, then evened out.
int64_t choose_tile_rows(int64_t N, int64_t preferred, int64_t multiple) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = round_up(std::max<int64_t>((N + preferred - 1) / preferred, std::min(threads, N)), threads);
  return round_up(std::max<int64_t>(1, (N + tiles - 1) / tiles), multiple);
}

// The listed update is used while the active vectors are at most this fraction of K; above it the dense GEMM over
// all K (which reads all of V) is the faster way.
constexpr int64_t kListedMaxFractionDenom = 4;

template <typename T, typename Engine>
void run_tiled(const Engine& eng, const at::Tensor& h, const at::Tensor& V, const Steering& st,
               const at::Tensor& P_out) {
  const int64_t N = h.size(0), d = h.size(1), K = st.K;
  const int64_t tile = eng.tile_rows;
  const int64_t ntiles = (N + tile - 1) / tile;
  const int64_t ldP = P_out.stride(0), ldh = h.stride(0);
  float* P_data = P_out.mutable_data_ptr<float>();
  T* h_data = st.row ? h.mutable_data_ptr<T>() : nullptr;
  const T* v = V.const_data_ptr<T>();

  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    const auto s = eng.carve(thread_buffer(kScratch, eng.scratch_bytes()));
    std::vector<int64_t> steered(tile);
    std::vector<uint8_t> active(st.row ? K : 0);
    ListedDeltas listed;
    eng.begin_thread();
    for (int64_t t = begin; t < end; ++t) {
      const TileArgs ta{t * tile, std::min(tile, N - t * tile)};
      eng.project(s, ta);
      int64_t S = 0;
      std::fill(active.begin(), active.end(), 0);
      for (int64_t i = 0; i < ta.m; ++i) {
        const int64_t n = ta.n0 + i;
        const float* p = eng.P_row(s, i);
        std::memcpy(P_data + n * ldP, p, K * sizeof(float));
        if (!steer_token(st, n, p, eng.delta_row(s, S))) continue;
        mark_active(eng.delta_row(s, S), K, active.data());
        steered[S++] = n;
      }
      if (S == 0) continue;
      const int64_t U = std::count(active.begin(), active.end(), uint8_t{1});
      if (U == 0) continue;  // every delta is exactly zero: h is unchanged
      if (U * kListedMaxFractionDenom <= K) {
        // A few vectors: their rows of V, in place, combined per block of columns.
        listed.gather(active.data(), K, S, [&](int64_t i) { return eng.delta_row(s, i); });
        add_listed(h_data, ldh, steered.data(), S, listed, v, d, 0, d);
        continue;
      }
      // D = delta V over all K in column blocks, each written back while it is still in cache.
      eng.prepare_dense();
      for (int64_t i = 0; i < S; ++i) eng.pack_delta_row(s, i);
      for (int64_t c0 = 0; c0 < d; c0 += eng.col_block) {
        const int64_t cols = std::min(eng.col_block, d - c0);
        eng.update(s, S, c0, cols);
        for (int64_t i = 0; i < S; ++i) add_row(h_data + steered[i] * ldh + c0, eng.D_row(s, i), cols);
      }
    }
    eng.finish_thread();
  });
}

template <typename T>
void dispatch(const at::Tensor& h, const at::Tensor& V, const Steering& st, const at::Tensor& P_out) {
  const int64_t N = h.size(0), d = h.size(1);
  bool amx = false;
#if EMOKERN_X86_AVX512
  // could_pack: oneDNN's verdict that AMX-BF16 is there and allowed, which also lets
  // torch.backends.mkldnn.flags(enabled=False) turn this path off as it does PyTorch's own AMX kernels.
  if constexpr (!std::is_same_v<T, float>) amx = cpu_has_avx512() && cpublas::could_pack(at::kBFloat16) && amx_permitted();
#endif
  // With V's packing cached, the tiled path is the faster one at every N (measured at N = 1: 5 us against 11-21 us
  // for the direct path, which also wakes the second thread). The AMX engine packs V on every call, and so does
  // every engine for a V that cannot be cached (an inference tensor, or the cache turned off): for a few tokens
  // that costs more than the direct path.
  if (N <= kDirectMaxTokens && (amx || !cpu::pack_cacheable(V))) return run_direct<T>(h, V, st, P_out);
#if EMOKERN_X86_AVX512
  if constexpr (!std::is_same_v<T, float>) {
    if (amx) {
      const int64_t row_bytes = (std::is_same_v<T, BFloat16> ? 1 : 2) * round_up(d, 32) * 2;
      return run_tiled<T>(AmxEngine<T>(h, V, choose_tile_rows(N, tile_rows_for(row_bytes, 32), 32)), h, V, st, P_out);
    }
  }
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (Bf16DotEngine::usable(h)) {
      return run_tiled<T>(Bf16DotEngine(h, V, choose_tile_rows(N, tile_rows_for(d * 2, 6), 1)), h, V, st, P_out);
    }
  }
#endif
  run_tiled<T>(F32Engine<T>(h, V, choose_tile_rows(N, tile_rows_for(d * 4, 16), 1)), h, V, st, P_out);
}

void project_and_steer_impl(const char* op, const at::Tensor& h, const at::Tensor& V, const Steering& st,
                            const at::Tensor& P_out) {
  if (h.size(0) == 0) return;
  if (h.size(1) == 0) {
    // No features: every projection is 0 and there is nothing to steer.
    P_out.zero_();
    return;
  }
  switch (h.scalar_type()) {
    case at::kFloat: return dispatch<float>(h, V, st, P_out);
    case at::kHalf: return dispatch<Half>(h, V, st, P_out);
    case at::kBFloat16: return dispatch<BFloat16>(h, V, st, P_out);
    default: TORCH_CHECK(false, op, ": unsupported dtype ", h.scalar_type());
  }
}

void project_cpu(const at::Tensor& h, const at::Tensor& V, const at::Tensor& P_out) {
  constexpr const char* op = "emokern::project";
  check_hidden_and_vectors(op, h, V);
  check_projection_out(op, h, V, P_out);
  project_and_steer_impl(op, h, V, Steering{nullptr, nullptr, nullptr, nullptr, nullptr, V.size(0)}, P_out);
}

void project_and_steer_cpu(const at::Tensor& h, const at::Tensor& V, const at::Tensor& row, const at::Tensor& a,
                           const at::Tensor& b, const at::Tensor& lo, const at::Tensor& hi,
                           const at::Tensor& P_out) {
  constexpr const char* op = "emokern::project_and_steer_";
  check_hidden_and_vectors(op, h, V);
  check_projection_out(op, h, V, P_out);
  check_steering_tables(op, h, V, row, a, b, lo, hi);
  // Validated before anything is written, so a bad index leaves h and P_out untouched.
  const int32_t* r = row.const_data_ptr<int32_t>();
  const int64_t R = a.size(0);
  for (int64_t n = 0; n < row.size(0); ++n) {
    TORCH_CHECK(r[n] >= -1 && r[n] < R, op, ": argument 'row' must hold values in [-1, R) = [-1, ", R,
                ") (-1 = not steered, R = a.shape[0]); got row[", n, "] = ", r[n]);
  }
  project_and_steer_impl(op, h, V,
                         Steering{r, a.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                  lo.const_data_ptr<float>(), hi.const_data_ptr<float>(), V.size(0)},
                         P_out);
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CPU, m) {
  m.impl("project", &emokern::project_cpu);
  m.impl("project_and_steer_", &emokern::project_and_steer_cpu);
}
