// NEON (AArch64 Advanced SIMD) vector helpers, included only by *_neon.cpp
// files. Static inline for the same reason as avx2.h.
#pragma once
#include <arm_neon.h>

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

}  // namespace simd_neon
}  // namespace prism
