// Row softmax with per-key weights and visibility:
//   out[j] = w_j * exp(z_j) / sum_k w_k * exp(z_k),  z_j = s_j + mask_j,
// where w_j = counts[j] enters as the bias log(w_j) (w_j = 0 masks key j) and,
// when positions are given, key j is visible only if k_pos[j] <= q_pos.
// A row with no visible key (or all logits -inf) comes out as zeros.
// Non-finite input, the same on every ISA (docs/errors.md): a hidden key
// (count 0, future position) is -inf whatever its score; a visible logit
// that is NaN or +inf makes the whole row NaN (as torch.softmax does).
#pragma once
#include <cstdint>

namespace prism {

struct SoftmaxRow {
  const float* scores;    // [nk]
  float* out;             // [nk]; may equal scores (in place)
  const float* key_bias;  // [nk] log(counts), -inf for count 0; or nullptr
  const float* add_mask;  // [nk] additive mask, element stride add_mask_stride; or nullptr
  int64_t add_mask_stride;  // 1, or 0 for a mask broadcast along keys
  const int32_t* k_pos;   // [nk] or nullptr (then q_pos is ignored)
  int32_t q_pos;
  int64_t nk;
};

#define PRISM_MASKED_SOFTMAX_DECL(isa) void masked_softmax_row_f32_##isa(const SoftmaxRow& r);
PRISM_MASKED_SOFTMAX_DECL(serial)
PRISM_MASKED_SOFTMAX_DECL(avx2)
PRISM_MASKED_SOFTMAX_DECL(avx512)
PRISM_MASKED_SOFTMAX_DECL(neon)
#undef PRISM_MASKED_SOFTMAX_DECL

}  // namespace prism
