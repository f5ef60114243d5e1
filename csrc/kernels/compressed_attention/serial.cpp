#include "compressed_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace prism {

void compressed_attention_f32_serial(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  constexpr int64_t kBlock = 64;  // keys per online-softmax step
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> s(kBlock), acc(h.dh);
  for (int64_t i = q_begin; i < q_end; ++i) {
    const float* q = h.q + i * h.q_stride;
    float running_max = neg_inf, running_sum = 0.0f;
    bool bad = false;  // a visible logit was NaN or +inf: the row is NaN (as torch)
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j0 = 0; j0 < h.nk; j0 += kBlock) {
      const int64_t nb = std::min(kBlock, h.nk - j0);
      float block_max = neg_inf;
      for (int64_t t = 0; t < nb; ++t) {
        const int64_t j = j0 + t;
        float z = neg_inf;
        // Hidden keys (count 0, future position) take no part: their key and
        // value are never read, so a NaN there cannot reach this row.
        const bool hidden = (h.k_pos && h.k_pos[j] > h.q_pos[i]) || (h.key_bias && h.key_bias[j] == neg_inf);
        if (!hidden) {
          const float* k = h.k + j * h.k_stride;
          float dot = 0.0f;
          for (int64_t c = 0; c < h.dh; ++c) dot += q[c] * k[c];
          z = dot * h.scale;
          if (h.key_bias) z += h.key_bias[j];
          if (!(z < std::numeric_limits<float>::infinity())) {  // NaN or +inf
            bad = true;
            z = neg_inf;
          }
        }
        s[t] = z;
        block_max = std::max(block_max, z);
      }
      if (block_max == neg_inf) continue;  // nothing visible in this block
      const float new_max = std::max(running_max, block_max);
      const float rescale = std::exp(running_max - new_max);  // 0 on the first visible block
      running_sum *= rescale;
      for (int64_t c = 0; c < h.dh; ++c) acc[c] *= rescale;
      for (int64_t t = 0; t < nb; ++t) {
        const float p = std::exp(s[t] - new_max);
        // A key of weight 0 is not read: 0 * inf in its value would be NaN.
        if (!(p > 0.0f)) continue;
        running_sum += p;
        const float* v = h.v + (j0 + t) * h.v_stride;
        for (int64_t c = 0; c < h.dh; ++c) acc[c] += p * v[c];
      }
      running_max = new_max;
    }
    float* o = h.out + i * h.out_stride;
    if (bad) {
      for (int64_t c = 0; c < h.dh; ++c) o[c] = nan;
      continue;
    }
    const float inv = running_sum > 0.0f ? 1.0f / running_sum : 0.0f;
    for (int64_t c = 0; c < h.dh; ++c) o[c] = acc[c] * inv;
  }
}

}  // namespace prism
