// AVX-512F vector helpers, included only by *_avx512.cpp files. Static inline
// for the same reason as avx2.h.
#pragma once
// GCC 12 warns about the _mm512_undefined_* placeholders inside its own
// AVX-512 intrinsics (GCC PR105593); the warnings point into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

namespace prism {
namespace simd_avx512 {

// exp(x): the reduction and polynomial of simd_avx2::exp_ps, evaluated in
// one Horner chain, with 2^n applied by VSCALEFPS: 15 instructions instead
// of 19. x below ln(FLT_MIN) = -87.34 gives 0 (exp(-inf) == 0) through the
// zeroing mask, never through a subnormal result: an underflowing VSCALEFPS
// takes a microcode assist that costs more than the rest of a softmax row.
// Above 88.37 it saturates at 2.4e38; NaN in gives NaN (the mask keeps it).
static inline __m512 exp_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365447505531f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
  // max/min return their second operand when either is NaN: keep x second.
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, y, n);
}

// Horizontal sum / max (as simd_avx2::hsum / hmax).
static inline float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 s = _mm512_castps512_ps128(v);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax(__m512 v) {
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 s = _mm512_castps512_ps128(v);
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Mask of the first `n` (0..16) lanes.
static inline __mmask16 tail_mask(long n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}


// The vector layer of csrc/simd/README.md.
constexpr int W = 16;
using vf = __m512;
using vi = __m512i;

static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline vf vload_part(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
static inline void vstore_part(float* p, vf x, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vexp(vf x) { return exp_ps(x); }
static inline float vhsum(vf x) { return hsum(x); }
static inline float vhmax(vf x) { return hmax(x); }
static inline vf vselect_eq(vf a, vf b, vf x, vf y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x);
}
static inline vf vselect_lt(vf a, vf b, vf x, vf y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
static inline vf vkeep_first(vf x, int n, vf y) { return _mm512_mask_blend_ps(tail_mask(n), y, x); }
static inline bool vany_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
static inline vi vset1_i32(int32_t x) { return _mm512_set1_epi32(x); }
static inline vi vload_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline vi vload_i32_part(const int32_t* p, int n) { return _mm512_maskz_loadu_epi32(tail_mask(n), p); }
static inline vf vhide_gt(vf s, vi a, vi b) {
  return _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(a, b), s, _mm512_set1_ps(-__builtin_inff()));
}
// Quantized weights, as simd_avx2::vload_i8x16 / vload_u4x32 (AVX-512F only:
// the byte unpacking runs on the 128-bit SSE2 part).
constexpr int kI8Vecs = 16 / W;
constexpr int kU4Vecs = 32 / W;
static inline void vload_i8x16(const int8_t* p, vf* out) {
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline void vload_u4x32(const uint8_t* p, vf* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
}

// Through memory: only the attention's query packing uses it, once per W x W block of q.
static inline void vtranspose(vf r[16]) {
  alignas(64) float t[16 * 16];
  for (int i = 0; i < 16; ++i) _mm512_store_ps(t + 16 * i, r[i]);
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_i32gather_ps(column, t + i, 4);
}

}  // namespace simd_avx512
}  // namespace prism
