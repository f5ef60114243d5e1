// NEON segment means. Each lane owns one column and adds the rows in order, so
// the result is bit-identical to the serial kernel. Columns go in blocks of 16
// (four independent accumulators held in registers), then 4, then a scalar
// tail; every mean is written once, and x is read once.
#include <cstdint>

#include "segment_means.h"
#include "simd/neon.h"

namespace prism {
namespace {

// Means of columns [c, c + 4 * kVecs) over rows [r0, r1) of a.x, skipping
// invalid rows when kMasked.
template <int kVecs, bool kMasked>
static inline void mean_columns(const SegmentMeansArgs& a, int64_t r0, int64_t r1, int64_t c, float32x4_t inv,
                                float* mean) {
  float32x4_t acc[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = vdupq_n_f32(0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    if (kMasked && !a.valid[r]) continue;
    const float* row = a.x + r * a.x_stride + c;
    for (int v = 0; v < kVecs; ++v) acc[v] = vaddq_f32(acc[v], vld1q_f32(row + 4 * v));
  }
  for (int v = 0; v < kVecs; ++v) vst1q_f32(mean + c + 4 * v, vmulq_f32(acc[v], inv));
}

// The last d % 4 columns, one at a time.
template <bool kMasked>
static inline void mean_column(const SegmentMeansArgs& a, int64_t r0, int64_t r1, int64_t c, float inv, float* mean) {
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r)
    if (!kMasked || a.valid[r]) acc += a.x[r * a.x_stride + c];
  mean[c] = acc * inv;
}

template <bool kMasked>
static void segments(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    const int64_t r0 = s * a.seg, r1 = r0 + a.seg < a.n ? r0 + a.seg : a.n;
    int64_t count = r1 - r0;
    if (kMasked) {
      count = 0;
      for (int64_t r = r0; r < r1; ++r) count += a.valid[r] != 0;
    }
    a.counts[s] = static_cast<float>(count);
    // With count 0 no row is added and inv = 0, so the mean comes out zero.
    const float inv = count > 0 ? 1.0f / static_cast<float>(count) : 0.0f;
    float* mean = a.means + s * a.d;
    int64_t c = 0;
    for (; c + 16 <= a.d; c += 16) mean_columns<4, kMasked>(a, r0, r1, c, vdupq_n_f32(inv), mean);
    for (; c + 4 <= a.d; c += 4) mean_columns<1, kMasked>(a, r0, r1, c, vdupq_n_f32(inv), mean);
    for (; c < a.d; ++c) mean_column<kMasked>(a, r0, r1, c, inv, mean);
  }
}

}  // namespace

void segment_means_f32_neon(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  if (a.valid)
    segments<true>(a, seg_begin, seg_end);
  else
    segments<false>(a, seg_begin, seg_end);
}

}  // namespace prism
