// AVX2+FMA vector helpers, included only by *_avx2.cpp files (compiled with
// -mavx2 -mfma). Everything is static inline: internal linkage, so no AVX copy
// of a helper can be picked by the linker for code running on other CPUs.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace prism {
namespace simd_avx2 {

// exp(x) for float lanes, Cephes-style: x = n ln2 + r, |r| <= ln2/2, then
// 2^n * P(r). Max relative error ~2 ulp on [-87, 88]; below ~-87.3 results
// go subnormal and then flush to 0 (exp(-inf) == 0), above 88.37 they saturate
// at 2.4e38. NaN in gives NaN out, as std::exp (the serial kernels rely on it).
static inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
  // max/min return their second operand when either is NaN: keep x second.
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n through the exponent field; n = -127 gives 0 (flush), n <= 128 here.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 scale = _mm256_castsi256_ps(_mm256_max_epi32(e, _mm256_setzero_si256()));
  return _mm256_mul_ps(y, scale);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane mask for the first `n` (0..8) lanes, for masked loads/stores of tails.
static inline __m256i tail_mask(long n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}


// The vector layer the shared kernels (csrc/kernels/*/simd_impl.inc) are
// written against; the contract is described once, in csrc/simd/README.md.
constexpr int W = 8;
using vf = __m256;
using vi = __m256i;

static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline vf vload_part(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
static inline void vstore_part(float* p, vf x, int n) { _mm256_maskstore_ps(p, tail_mask(n), x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vexp(vf x) { return exp_ps(x); }
static inline float vhsum(vf x) { return hsum(x); }
static inline float vhmax(vf x) { return hmax(x); }
static inline vf vselect_eq(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
static inline vf vkeep_first(vf x, int n, vf y) { return _mm256_blendv_ps(y, x, _mm256_castsi256_ps(tail_mask(n))); }
static inline bool vany_gt(vf a, vf b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
static inline vi vset1_i32(int32_t x) { return _mm256_set1_epi32(x); }
static inline vi vload_i32(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline vi vload_i32_part(const int32_t* p, int n) { return _mm256_maskload_epi32(p, tail_mask(n)); }
static inline vf vhide_gt(vf s, vi a, vi b) {
  return _mm256_blendv_ps(s, _mm256_set1_ps(-__builtin_inff()), _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b)));
}

// Weight-only quantized kernels (csrc/kernels/quantized_linear): 16 int8
// weights, or 16 bytes of 32 packed 4-bit weights (weight 2i in the low
// nibble of byte i, 2i+1 in the high one), as float lanes in weight order.
// Each reads exactly 16 bytes.
constexpr int kI8Vecs = 16 / W;
constexpr int kU4Vecs = 32 / W;
static inline void vload_i8x16(const int8_t* p, vf* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}
static inline void vload_u4x32(const uint8_t* p, vf* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i a0 = _mm_unpacklo_epi8(lo, hi), a1 = _mm_unpackhi_epi8(lo, hi);  // weights 0..15, 16..31
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a0));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a0, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a1));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a1, 8)));
}

static inline void vtranspose(vf r[8]) {
  const vf t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const vf t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const vf t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const vf t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const vf u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const vf u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const vf u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const vf u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

}  // namespace simd_avx2
}  // namespace prism
