// Compressed attention for one (batch, head): for each query i,
//   out_i = sum_j w_j exp(s_ij) v_j / sum_j w_j exp(s_ij),  s_ij = scale * q_i . k_j,
// with w_j = counts[j] entering as the bias log(w_j) (count 0 masks key j) and,
// when positions are given, key j visible to query i only if k_pos[j] <= q_pos[i].
// Online (flash-style) softmax over key blocks: the nq x nk score matrix is
// never materialised. A query with no visible key gets a zero row.
// Non-finite input, the same on every ISA (docs/errors.md): a hidden key
// (count 0, future position) is never read; a visible logit that is NaN or
// +inf makes the whole row NaN; a key of weight 0 (logit -inf, or exp
// underflow) is not read, so its value cannot turn the row NaN; otherwise
// NaN/inf in a value propagates through p * v as in IEEE arithmetic.
#pragma once
#include <cstdint>

namespace prism {

struct AttentionHead {
  const float* q;  // [nq, dh], row stride q_stride
  const float* k;  // [nk, dh], row stride k_stride
  const float* v;  // [nk, dh], row stride v_stride
  float* out;      // [nq, dh], row stride out_stride
  const float* key_bias;  // [nk] log(counts), -inf for count 0; or nullptr
  const int32_t* q_pos;   // [nq] or nullptr (then k_pos is nullptr too)
  const int32_t* k_pos;   // [nk] or nullptr
  int64_t nq, nk, dh;
  int64_t q_stride, k_stride, v_stride, out_stride;
  float scale;
};

// Queries [q_begin, q_end) of one head.
#define PRISM_COMPRESSED_ATTENTION_DECL(isa)                                          \
  void compressed_attention_f32_##isa(const AttentionHead& h, int64_t q_begin, \
                                      int64_t q_end);
PRISM_COMPRESSED_ATTENTION_DECL(serial)
PRISM_COMPRESSED_ATTENTION_DECL(avx2)
PRISM_COMPRESSED_ATTENTION_DECL(avx512)
PRISM_COMPRESSED_ATTENTION_DECL(neon)
#undef PRISM_COMPRESSED_ATTENTION_DECL

}  // namespace prism
