// AVX2+FMA compressed attention: the tiled kernel of simd_impl.inc on 8-lane
// vectors. 16 ymm registers: score tiles of 6 keys x 16 queries and P.V tiles
// of 6 queries x 16 columns keep 12 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/avx2.h"

namespace prism {
namespace {

using namespace simd_avx2;

constexpr int W = 8;
using vf = __m256;
using vi = __m256i;
constexpr int kQVecs = 2;
constexpr int kScoreKeys = 6;
constexpr int kPvRows = 6;
constexpr int kPvVecs = 2;

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
static inline vf vselect_eq(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
static inline bool vany_gt(vf a, vf b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
static inline vi vload_i32(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline vf vhide(vf s, int32_t kpos, vi qpos) {
  const vf hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(kpos), qpos));
  return _mm256_blendv_ps(s, _mm256_set1_ps(-__builtin_inff()), hidden);
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

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_avx2(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
