// AVX-512F compressed attention: the tiled kernel of simd_impl.inc on 16-lane
// vectors. 32 zmm registers: score tiles of 8 keys x 32 queries and P.V tiles
// of 8 queries x 32 columns keep 16 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/avx512.h"

// GCC 12's avx512fintrin.h initialises its undefined-vector placeholders with
// themselves, which -Wmaybe-uninitialized reports once inlined here (GCC bug
// 105593, fixed in GCC 13); the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace prism {
namespace {

using namespace simd_avx512;

constexpr int W = 16;
using vf = __m512;
using vi = __m512i;
constexpr int kQVecs = 2;
constexpr int kScoreKeys = 8;
constexpr int kPvRows = 8;
constexpr int kPvVecs = 2;

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
static inline vf vselect_eq(vf a, vf b, vf x, vf y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x);
}
static inline vf vselect_lt(vf a, vf b, vf x, vf y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
static inline bool vany_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
static inline vi vload_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline vf vhide(vf s, int32_t kpos, vi qpos) {
  return _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32(kpos), qpos), s,
                              _mm512_set1_ps(-__builtin_inff()));
}
// Through memory: only the query packing uses it, once per W x W block of q.
static inline void vtranspose(vf r[16]) {
  alignas(64) float t[16 * 16];
  for (int i = 0; i < 16; ++i) _mm512_store_ps(t + 16 * i, r[i]);
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_i32gather_ps(column, t + i, 4);
}

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_avx512(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
