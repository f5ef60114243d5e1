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

// Consecutive rows [0, rows) of one leading index: the side inputs advance
// with the row by plain strides, so the kernels have no per-row set-up.
struct SoftmaxRows {
  const float* scores;    // [rows, nk], contiguous
  float* out;             // [rows, nk], contiguous; may equal scores (in place)
  const float* key_bias;  // [nk] log(counts), -inf for count 0; or nullptr
  bool key_bias_hides;    // some key_bias is -inf (a count 0)
  const float* add_mask;  // row r, key j at add_mask[r * mask_row_stride + j * mask_key_stride]; or nullptr
  int64_t mask_row_stride, mask_key_stride;  // any (0 broadcasts)
  const int32_t* k_pos;   // [nk] or nullptr (then q_pos is nullptr too)
  const int32_t* q_pos;   // [rows] or nullptr
  int64_t rows, nk;
  float* scratch;         // softmax_scratch_floats(nk) floats for the kernel
};

// Scratch the kernels need for rows of nk keys (one float per online block
// of at least 16 keys, rounded up to a vector of at most 16 lanes). The
// driver allocates it: the ISA files hold no code outside their own.
inline int64_t softmax_scratch_floats(int64_t nk) { return (nk + 15) / 16 + 16; }

#define PRISM_MASKED_SOFTMAX_DECL(isa) void masked_softmax_f32_##isa(const SoftmaxRows& r);
PRISM_MASKED_SOFTMAX_DECL(serial)
PRISM_MASKED_SOFTMAX_DECL(avx2)
PRISM_MASKED_SOFTMAX_DECL(avx512)
PRISM_MASKED_SOFTMAX_DECL(neon)
#undef PRISM_MASKED_SOFTMAX_DECL

}  // namespace prism
