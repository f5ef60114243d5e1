// NEON (AArch64) compressed attention: the tiled kernel of simd_impl.inc on
// 4-lane vectors. 32 q registers: score tiles of 6 keys x 16 queries and P.V
// tiles of 6 queries x 16 columns keep 24 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/neon.h"

namespace prism {
namespace {

using namespace simd_neon;

constexpr int W = 4;
using vf = float32x4_t;
using vi = int32x4_t;
constexpr int kQVecs = 4;
constexpr int kScoreKeys = 6;
constexpr int kPvRows = 6;
constexpr int kPvVecs = 4;

static inline vf vzero() { return vdupq_n_f32(0.0f); }
static inline vf vset1(float x) { return vdupq_n_f32(x); }
static inline vf vload(const float* p) { return vld1q_f32(p); }
static inline void vstore(float* p, vf x) { vst1q_f32(p, x); }
static inline vf vbcast(const float* p) { return vld1q_dup_f32(p); }
// NEON has no masked loads/stores; tails go through a small buffer.
static inline vf vload_part(const float* p, int n) {
  float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return vld1q_f32(t);
}
static inline void vstore_part(float* p, vf x, int n) {
  float t[4];
  vst1q_f32(t, x);
  for (int i = 0; i < n; ++i) p[i] = t[i];
}
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vexp(vf x) { return exp_ps(x); }
static inline vf vselect_eq(vf a, vf b, vf x, vf y) { return vbslq_f32(vceqq_f32(a, b), x, y); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y) { return vbslq_f32(vcltq_f32(a, b), x, y); }
static inline bool vany_gt(vf a, vf b) { return vmaxvq_u32(vcgtq_f32(a, b)) != 0; }
static inline vi vload_i32(const int32_t* p) { return vld1q_s32(p); }
static inline vf vhide(vf s, int32_t kpos, vi qpos) {
  return vbslq_f32(vcgtq_s32(vdupq_n_s32(kpos), qpos), vdupq_n_f32(-__builtin_inff()), s);
}
static inline void vtranspose(vf r[4]) {
  const float32x4x2_t t01 = vtrnq_f32(r[0], r[1]), t23 = vtrnq_f32(r[2], r[3]);
  r[0] = vcombine_f32(vget_low_f32(t01.val[0]), vget_low_f32(t23.val[0]));
  r[1] = vcombine_f32(vget_low_f32(t01.val[1]), vget_low_f32(t23.val[1]));
  r[2] = vcombine_f32(vget_high_f32(t01.val[0]), vget_high_f32(t23.val[0]));
  r[3] = vcombine_f32(vget_high_f32(t01.val[1]), vget_high_f32(t23.val[1]));
}

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_neon(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
