// Weight-only quantized linear layers and their dequantization (the layouts
// are those of QuantProblem in ops.h). The activations stay float32: each
// weight is converted to float in registers and multiplied in (no activation
// quantization), so the result is that of the dequantized float weights.
//
// Accuracy: int8 forms sum_k x[k] * q[k] exactly per product (q is a small
// integer) and rounds only in the float32 sum, then multiplies by scale; int4
// forms each weight as fma(q, scale, offset) (the float32 rounding of the
// exact weight, as int4_dequantize writes it) and sums x * w in float32. Each
// output lane adds its terms in k order (serial: one sum; SIMD: W lane sums
// then a horizontal sum), so with u = 2^-24 and S = sum_k |x[k] w[k]|,
// |y - y_exact| <= (K + 4) u (S + |bias|) (a worst-case bound; random inputs
// stay two orders of magnitude below it). Every output element is computed by
// one thread in an order fixed by the ISA alone, so results do not depend on
// the thread count or on how M and N are split.
#pragma once
#include <cstdint>

#include "ops.h"

namespace prism {

// Computes output columns (weight rows) [n_begin, n_end) for every input row.
#define PRISM_QUANT_DECL(isa)                                                            \
  void int8_linear_f32_##isa(const QuantProblem& p, int64_t n_begin, int64_t n_end);     \
  void int4_linear_f32_##isa(const QuantProblem& p, int64_t n_begin, int64_t n_end);     \
  void int8_dequantize_f32_##isa(const QuantProblem& p, int64_t n_begin, int64_t n_end); \
  void int4_dequantize_f32_##isa(const QuantProblem& p, int64_t n_begin, int64_t n_end);
PRISM_QUANT_DECL(serial)
PRISM_QUANT_DECL(avx2)
PRISM_QUANT_DECL(avx512)
PRISM_QUANT_DECL(neon)
#undef PRISM_QUANT_DECL

}  // namespace prism
