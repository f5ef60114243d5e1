// AVX-512F segment means. Each lane owns one column and adds the rows in order,
// so the result is bit-identical to the serial kernel. Columns go in blocks of
// 64 (four independent accumulators held in registers); every mean is written
// once, and x is read once.
#include <cstdint>

#include "segment_means.h"
#include "simd/avx512.h"

namespace prism {
namespace {

using namespace simd_avx512;

// Means of columns [c, c + 16 * kVecs) over rows [r0, r1) of a.x, skipping
// invalid rows when kMasked. kTail: one vector of the lanes set in `tail`.
template <int kVecs, bool kMasked, bool kTail>
static inline void mean_columns(const SegmentMeansArgs& a, int64_t r0, int64_t r1, int64_t c, __mmask16 tail,
                                __m512 inv, float* mean) {
  __m512 acc[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    if (kMasked && !a.valid[r]) continue;
    const float* row = a.x + r * a.x_stride + c;
    for (int v = 0; v < kVecs; ++v)
      acc[v] = _mm512_add_ps(acc[v], kTail ? _mm512_maskz_loadu_ps(tail, row) : _mm512_loadu_ps(row + 16 * v));
  }
  for (int v = 0; v < kVecs; ++v) {
    if (kTail)
      _mm512_mask_storeu_ps(mean + c, tail, _mm512_mul_ps(acc[v], inv));
    else
      _mm512_storeu_ps(mean + c + 16 * v, _mm512_mul_ps(acc[v], inv));
  }
}

template <bool kMasked>
static void segments(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  const __mmask16 tail = tail_mask(a.d % 16);
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    const int64_t r0 = s * a.seg, r1 = r0 + a.seg < a.n ? r0 + a.seg : a.n;
    int64_t count = r1 - r0;
    if (kMasked) {
      count = 0;
      for (int64_t r = r0; r < r1; ++r) count += a.valid[r] != 0;
    }
    a.counts[s] = static_cast<float>(count);
    // With count 0 no row is added and inv = 0, so the mean comes out zero.
    const __m512 inv = _mm512_set1_ps(count > 0 ? 1.0f / static_cast<float>(count) : 0.0f);
    float* mean = a.means + s * a.d;
    int64_t c = 0;
    for (; c + 64 <= a.d; c += 64) mean_columns<4, kMasked, false>(a, r0, r1, c, tail, inv, mean);
    for (; c + 16 <= a.d; c += 16) mean_columns<1, kMasked, false>(a, r0, r1, c, tail, inv, mean);
    if (c < a.d) mean_columns<1, kMasked, true>(a, r0, r1, c, tail, inv, mean);
  }
}

}  // namespace

void segment_means_f32_avx512(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  if (a.valid)
    segments<true>(a, seg_begin, seg_end);
  else
    segments<false>(a, seg_begin, seg_end);
}

}  // namespace prism
