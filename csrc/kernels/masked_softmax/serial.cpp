#include "masked_softmax.h"

#include <cmath>
#include <limits>

namespace prism {

void masked_softmax_row_f32_serial(const SoftmaxRow& r) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float max_z = neg_inf;
  bool bad = false;  // a visible logit is NaN or +inf: the row is NaN, as in torch
  for (int64_t j = 0; j < r.nk; ++j) {
    float z = neg_inf;
    // Hidden keys (count 0, future position) are -inf whatever their score.
    const bool hidden = (r.key_bias && r.key_bias[j] == neg_inf) || (r.k_pos && r.k_pos[j] > r.q_pos);
    if (!hidden) {
      z = r.scores[j];
      if (r.key_bias) z += r.key_bias[j];
      if (r.add_mask) z += r.add_mask[j * r.add_mask_stride];
      bad |= !(z < std::numeric_limits<float>::infinity());
    }
    r.out[j] = z;
    max_z = std::fmax(max_z, z);
  }
  if (bad || max_z == neg_inf) {
    const float fill = bad ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    for (int64_t j = 0; j < r.nk; ++j) r.out[j] = fill;
    return;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < r.nk; ++j) {
    const float e = std::exp(r.out[j] - max_z);
    r.out[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < r.nk; ++j) r.out[j] *= inv;
}

}  // namespace prism
