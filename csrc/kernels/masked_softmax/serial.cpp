#include <cmath>
#include <limits>

#include "masked_softmax.h"

namespace prism {

void masked_softmax_f32_serial(const SoftmaxRows& rows) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < rows.rows; ++i) {
    const float* scores = rows.scores + i * rows.nk;
    float* out = rows.out + i * rows.nk;
    const float* mask = rows.add_mask ? rows.add_mask + i * rows.mask_row_stride : nullptr;
    const int32_t q_pos = rows.q_pos ? rows.q_pos[i] : 0;
    float max_z = neg_inf;
    bool bad = false;  // a visible logit is NaN or +inf: the row is NaN, as in torch
    for (int64_t j = 0; j < rows.nk; ++j) {
      float z = neg_inf;
      // Hidden keys (count 0, future position) are -inf whatever their score.
      const bool hidden = (rows.key_bias && rows.key_bias[j] == neg_inf) || (rows.k_pos && rows.k_pos[j] > q_pos);
      if (!hidden) {
        z = scores[j];
        if (rows.key_bias) z += rows.key_bias[j];
        if (mask) z += mask[j * rows.mask_key_stride];
        bad |= !(z < std::numeric_limits<float>::infinity());
      }
      out[j] = z;
      max_z = std::fmax(max_z, z);
    }
    if (bad || max_z == neg_inf) {
      const float fill = bad ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
      for (int64_t j = 0; j < rows.nk; ++j) out[j] = fill;
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < rows.nk; ++j) {
      const float e = std::exp(out[j] - max_z);
      out[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < rows.nk; ++j) out[j] *= inv;
  }
}

}  // namespace prism
