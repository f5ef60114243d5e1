// NEON masked softmax of one row, three passes over out (which stays in L1 for
// the usual row lengths): logits + running max, exp + sum, scale. The logits
// are summed in the serial kernel's order; only exp_ps (~2 ulp) and the order
// of the final sum differ from it. NEON has no masked loads: the row tail
// (< 4 keys) goes through small stack buffers.
#include <cstdint>

#include "masked_softmax.h"
#include "simd/neon.h"

namespace prism {
namespace {

using namespace simd_neon;

// `lanes` (1..4) floats from p; the missing lanes are `pad`.
static inline float32x4_t load(const float* p, int64_t lanes, float pad) {
  if (lanes == 4) return vld1q_f32(p);
  float b[4] = {pad, pad, pad, pad};
  for (int64_t i = 0; i < lanes; ++i) b[i] = p[i];
  return vld1q_f32(b);
}

static inline void store(float* p, float32x4_t v, int64_t lanes) {
  if (lanes == 4) {
    vst1q_f32(p, v);
    return;
  }
  float b[4];
  vst1q_f32(b, v);
  for (int64_t i = 0; i < lanes; ++i) p[i] = b[i];
}

// z for keys [j, j + lanes): score + key bias + mask, -inf where the key is
// hidden and in lanes past the row.
static inline float32x4_t logits(const SoftmaxRow& r, int64_t j, int64_t lanes) {
  const float neg_inf = -__builtin_huge_valf();
  float32x4_t z = load(r.scores + j, lanes, neg_inf);
  if (r.key_bias) z = vaddq_f32(z, load(r.key_bias + j, lanes, 0.0f));
  if (r.add_mask) {
    float32x4_t m;
    if (r.add_mask_stride == 1) {
      m = load(r.add_mask + j, lanes, 0.0f);
    } else if (r.add_mask_stride == 0) {
      m = vdupq_n_f32(r.add_mask[0]);
    } else {  // any other stride: gather the lanes one by one
      float g[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < lanes; ++i) g[i] = r.add_mask[(j + i) * r.add_mask_stride];
      m = vld1q_f32(g);
    }
    z = vaddq_f32(z, m);
  }
  // A count-0 key is hidden whatever its score (NaN + -inf would be NaN).
  if (r.key_bias)
    z = vbslq_f32(vceqq_f32(load(r.key_bias + j, lanes, 0.0f), vdupq_n_f32(neg_inf)), vdupq_n_f32(neg_inf), z);
  if (r.k_pos) {
    int32x4_t kp;
    if (lanes == 4) {
      kp = vld1q_s32(r.k_pos + j);
    } else {
      int32_t b[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < lanes; ++i) b[i] = r.k_pos[j + i];
      kp = vld1q_s32(b);
    }
    z = vbslq_f32(vcgtq_s32(kp, vdupq_n_s32(r.q_pos)), vdupq_n_f32(neg_inf), z);
  }
  return z;
}

}  // namespace

void masked_softmax_row_f32_neon(const SoftmaxRow& r) {
  const int64_t n = r.nk, n4 = n - n % 4;
  const float neg_inf = -__builtin_huge_valf();

  // Pass 1: z into out, running max. FMAXNM ignores a NaN operand like
  // std::fmax does in the serial kernel.
  // ok: all ones in lanes where every z so far was < +inf (not NaN, not +inf).
  float32x4_t vmax = vdupq_n_f32(neg_inf);
  const float32x4_t pos_inf = vdupq_n_f32(__builtin_huge_valf());
  uint32x4_t ok = vdupq_n_u32(0xffffffffu);
  for (int64_t j = 0; j < n4; j += 4) {
    const float32x4_t z = logits(r, j, 4);
    vst1q_f32(r.out + j, z);
    vmax = vmaxnmq_f32(vmax, z);
    ok = vandq_u32(ok, vcltq_f32(z, pos_inf));
  }
  if (n4 < n) {
    const float32x4_t z = logits(r, n4, n - n4);
    store(r.out + n4, z, n - n4);
    vmax = vmaxnmq_f32(vmax, z);
    ok = vandq_u32(ok, vcltq_f32(z, pos_inf));
  }
  const float max_z = vmaxnmvq_f32(vmax);
  const bool bad = vminvq_u32(ok) == 0;
  if (bad || max_z == neg_inf) {  // NaN row, or nothing visible
    const float fill = bad ? __builtin_nanf("") : 0.0f;
    for (int64_t j = 0; j < n; ++j) r.out[j] = fill;
    return;
  }

  // Pass 2: e = exp(z - max), summed in two accumulators. Tail lanes past the
  // row load as -inf, so they add exp(-inf) = 0.
  const float32x4_t m = vdupq_n_f32(max_z);
  float32x4_t sum0 = vdupq_n_f32(0.0f), sum1 = vdupq_n_f32(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float32x4_t e0 = exp_ps(vsubq_f32(vld1q_f32(r.out + j), m));
    const float32x4_t e1 = exp_ps(vsubq_f32(vld1q_f32(r.out + j + 4), m));
    vst1q_f32(r.out + j, e0);
    vst1q_f32(r.out + j + 4, e1);
    sum0 = vaddq_f32(sum0, e0);
    sum1 = vaddq_f32(sum1, e1);
  }
  if (j < n4) {
    const float32x4_t e = exp_ps(vsubq_f32(vld1q_f32(r.out + j), m));
    vst1q_f32(r.out + j, e);
    sum0 = vaddq_f32(sum0, e);
  }
  if (n4 < n) {
    const float32x4_t e = exp_ps(vsubq_f32(load(r.out + n4, n - n4, neg_inf), m));
    store(r.out + n4, e, n - n4);
    sum1 = vaddq_f32(sum1, e);
  }

  // Pass 3: scale.
  const float32x4_t inv = vdupq_n_f32(1.0f / vaddvq_f32(vaddq_f32(sum0, sum1)));
  for (j = 0; j < n4; j += 4) vst1q_f32(r.out + j, vmulq_f32(vld1q_f32(r.out + j), inv));
  if (n4 < n) store(r.out + n4, vmulq_f32(load(r.out + n4, n - n4, 0.0f), inv), n - n4);
}

}  // namespace prism
