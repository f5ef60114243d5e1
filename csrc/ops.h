// Drivers: validate raw arguments, split work over the thread pool and call
// the per-ISA kernel. Used by the Python bindings, the C++ tests and benches.
// Errors are std::invalid_argument whose message starts with the argument name.
#pragma once
#include <cstdint>

#include "isa.h"

namespace prism {

enum class Kernel : int {
  segment_means = 0,
  compressed_attention = 1,
  masked_softmax = 2,
  int8_linear = 3,
  int4_linear = 4,
  int8_dequantize = 5,
  int4_dequantize = 6,
};
constexpr int kKernelCount = 7;
// The ISA whose code the driver of `kernel` ran on its latest call in this
// process (an Isa value), or -1 before its first call.
int last_dispatched_isa(Kernel kernel);

// x: [L, n, d] with element strides (x_batch_stride, x_row_stride, 1);
// valid: contiguous [L, n] or nullptr. means: [L, ceil(n/seg), d] and
// counts: [L, ceil(n/seg)], both contiguous.
struct SegmentMeansProblem {
  const float* x;
  const uint8_t* valid;
  float* means;
  float* counts;
  int64_t L, n, d, seg;
  int64_t x_batch_stride, x_row_stride;  // in elements
};
void segment_means_f32(const SegmentMeansProblem& p, Isa isa);

// q/k/v/out: [B, H, rows, dh] with element strides per dimension (the last
// dimension is contiguous). counts: [Bc, nk] with Bc in {1, B}, or nullptr;
// q_pos: [Bp, nq], k_pos: [Bp, nk] with Bp in {1, B}, both or neither.
struct AttentionProblem {
  const float *q, *k, *v;
  float* out;
  const float* counts;
  const int32_t *q_pos, *k_pos;
  int64_t B, H, nq, nk, dh;
  int64_t counts_batches, pos_batches;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];  // B, H, row
  float scale;
};
void compressed_attention_f32(const AttentionProblem& p, Isa isa);

// scores/out: contiguous [rows, nk] where rows = prod(lead) * nq, lead being
// the leading dimensions (lead_ndim of them, up to 8). counts: [Bc, nk],
// q_pos: [Bp, nq], k_pos: [Bp, nk] indexed by the first leading dimension
// (Bc, Bp in {1, lead[0]}). add_mask: arbitrary element strides over
// lead + (nq, nk) (0 for broadcast dimensions), or nullptr.
struct SoftmaxProblem {
  const float* scores;
  float* out;
  const float* counts;
  const int32_t *q_pos, *k_pos;
  const float* add_mask;
  int64_t lead_ndim;
  int64_t lead[8];
  int64_t mask_strides[10];
  int64_t nq, nk;
  int64_t counts_batches, pos_batches;
};
void masked_softmax_f32(const SoftmaxProblem& p, Isa isa);

// Weight-only quantized linear layers (csrc/kernels/quantized_linear/).
// int8: q int8 [N, K], scale [N]: w[n, k] = q[n, k] * scale[n].
// int4: q uint8 [N, K / 2], weight k of a row in byte k / 2 (low nibble for
// even k, high for odd k); scale and offset [N, K / group]:
// w[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k / group (one rounding).
// The linear kernels compute y[M, N] = x[M, K] @ w.T (+ bias[N]) with x rows
// at x_stride elements (last dimension contiguous) and y contiguous; the
// dequantize kernels write w into out [N, K] (contiguous; x, bias unused).
// q, scale, offset and bias are contiguous.
struct QuantProblem {
  const float* x;
  const void* q;
  const float *scale, *offset, *bias;
  float* out;
  int64_t M, N, K, group;
  int64_t x_stride;  // in elements
};
void int8_linear_f32(const QuantProblem& p, Isa isa);
void int4_linear_f32(const QuantProblem& p, Isa isa);
void int8_dequantize_f32(const QuantProblem& p, Isa isa);
void int4_dequantize_f32(const QuantProblem& p, Isa isa);

}  // namespace prism
