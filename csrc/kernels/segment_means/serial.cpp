#include "segment_means.h"

#include <algorithm>
#include <cstring>

namespace prism {

void segment_means_f32_serial(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    float* mean = a.means + s * a.means_stride;
    std::memset(mean, 0, sizeof(float) * a.d);
    const int64_t r1 = std::min(a.n, (s + 1) * a.seg);
    int64_t count = 0;
    for (int64_t r = s * a.seg; r < r1; ++r) {
      if (a.valid && !a.valid[r]) continue;
      const float* row = a.x + r * a.x_stride;
      for (int64_t c = 0; c < a.d; ++c) mean[c] += row[c];
      ++count;
    }
    if (a.counts) a.counts[s] = static_cast<float>(count);
    if (count > 0) {
      const float inv = 1.0f / static_cast<float>(count);
      for (int64_t c = 0; c < a.d; ++c) mean[c] *= inv;
    }
  }
}

}  // namespace prism
