// NEON (AArch64 Advanced SIMD) vector helpers, included only by *_neon.cpp
// files. Static inline for the same reason as avx2.h.
#pragma once
#include <arm_neon.h>

#include <cstdint>

namespace prism {
namespace simd_neon {

// exp(x), same algorithm, accuracy and NaN/range behaviour as simd_avx2::exp_ps
// (FMAX/FMIN propagate NaN, and NaN converts to integer 0 below).
static inline float32x4_t exp_ps(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-88.3762626647949f)), vdupq_n_f32(88.3762626647949f));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
  y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, r);
  y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, r);
  y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, r);
  y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, r);
  y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, r);
  y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), y, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t scale = vreinterpretq_f32_s32(vmaxq_s32(e, vdupq_n_s32(0)));
  return vmulq_f32(y, scale);
}


// The vector layer of csrc/simd/README.md.
constexpr int W = 4;
using vf = float32x4_t;
using vi = int32x4_t;

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
// NaN in gives NaN (x86 max_ps gives its second operand): the kernels never
// depend on which (their NaN checks come after the max).
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vexp(vf x) { return exp_ps(x); }
static inline float vhsum(vf x) { return vaddvq_f32(x); }
static inline float vhmax(vf x) { return vmaxnmvq_f32(x); }
static inline vf vselect_eq(vf a, vf b, vf x, vf y) { return vbslq_f32(vceqq_f32(a, b), x, y); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y) { return vbslq_f32(vcltq_f32(a, b), x, y); }
static inline vf vkeep_first(vf x, int n, vf y) {
  const int32_t lane[4] = {0, 1, 2, 3};
  return vbslq_f32(vcltq_s32(vld1q_s32(lane), vdupq_n_s32(n)), x, y);
}
static inline bool vany_gt(vf a, vf b) { return vmaxvq_u32(vcgtq_f32(a, b)) != 0; }
static inline vi vset1_i32(int32_t x) { return vdupq_n_s32(x); }
static inline vi vload_i32(const int32_t* p) { return vld1q_s32(p); }
static inline vi vload_i32_part(const int32_t* p, int n) {
  int32_t t[4] = {0, 0, 0, 0};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return vld1q_s32(t);
}
// Quantized weights, as simd_avx2::vload_i8x16 / vload_u4x32.
constexpr int kI8Vecs = 16 / W;
constexpr int kU4Vecs = 32 / W;
static inline void vload_i8x16(const int8_t* p, vf* out) {
  const int8x16_t b = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}
static inline void vwiden_u8x16(uint8x16_t b, vf* out) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
  out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  out[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
  out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  out[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
}
static inline void vload_u4x32(const uint8_t* p, vf* out) {
  const uint8x16_t b = vld1q_u8(p);
  const uint8x16x2_t z = vzipq_u8(vandq_u8(b, vdupq_n_u8(0x0F)), vshrq_n_u8(b, 4));  // weights 0..15, 16..31
  vwiden_u8x16(z.val[0], out);
  vwiden_u8x16(z.val[1], out + 4);
}
static inline vf vhide_gt(vf s, vi a, vi b) { return vbslq_f32(vcgtq_s32(a, b), vdupq_n_f32(-__builtin_inff()), s); }
static inline void vtranspose(vf r[4]) {
  const float32x4x2_t t01 = vtrnq_f32(r[0], r[1]), t23 = vtrnq_f32(r[2], r[3]);
  r[0] = vcombine_f32(vget_low_f32(t01.val[0]), vget_low_f32(t23.val[0]));
  r[1] = vcombine_f32(vget_low_f32(t01.val[1]), vget_low_f32(t23.val[1]));
  r[2] = vcombine_f32(vget_high_f32(t01.val[0]), vget_high_f32(t23.val[0]));
  r[3] = vcombine_f32(vget_high_f32(t01.val[1]), vget_high_f32(t23.val[1]));
}

}  // namespace simd_neon
}  // namespace prism
