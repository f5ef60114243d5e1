#include "segment_means.h"

#include <algorithm>
#include <cstring>

namespace prism {

namespace {

constexpr int64_t kColumns = 64;  // columns whose float64 totals live on the stack at once

// Adds the valid rows of [r0, r1) into part[0, cols) (float32, in row order)
// and returns how many there were.
int64_t add_rows(const SegmentMeansArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t cols, float* part) {
  int64_t count = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (a.valid && !a.valid[r]) continue;
    const float* row = a.x + r * a.x_stride + c0;
    for (int64_t c = 0; c < cols; ++c) part[c] += row[c];
    ++count;
  }
  return count;
}

}  // namespace

void segment_means_f32_serial(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    float* mean = a.means + s * a.means_stride;
    std::memset(mean, 0, sizeof(float) * a.d);
    const int64_t r0 = s * a.seg, r1 = std::min(a.n, (s + 1) * a.seg);
    int64_t count = 0;
    if (r1 - r0 <= kSegmentMeansBlock) {  // one block: its float32 sum is the total
      count = add_rows(a, r0, r1, 0, a.d, mean);
    } else {  // blocks of float32 sums into float64 totals (segment_means.h)
      for (int64_t c0 = 0; c0 < a.d; c0 += kColumns) {
        const int64_t cols = std::min(kColumns, a.d - c0);
        double total[kColumns] = {};
        float part[kColumns];
        count = 0;
        for (int64_t b = r0; b < r1; b += kSegmentMeansBlock) {
          std::fill(part, part + cols, 0.0f);
          count += add_rows(a, b, std::min(r1, b + kSegmentMeansBlock), c0, cols, part);
          for (int64_t c = 0; c < cols; ++c) total[c] += part[c];
        }
        for (int64_t c = 0; c < cols; ++c) mean[c0 + c] = static_cast<float>(total[c]);
      }
    }
    if (a.counts) a.counts[s] = static_cast<float>(count);
    if (count > 0) {
      const float inv = 1.0f / static_cast<float>(count);
      for (int64_t c = 0; c < a.d; ++c) mean[c] *= inv;
    }
  }
}

}  // namespace prism
