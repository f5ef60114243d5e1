// NEON quantized linear kernels: simd_impl.inc on the ISA's vector layer.
#include <cstdint>

#include "quantized_linear.h"
#include "simd/neon.h"

namespace prism {
namespace {

using namespace simd_neon;

// Weight rows streamed together, and input rows per tile: kRows x kMTile
// accumulators plus the converted weights stay in registers.
constexpr int kRows = 4;
constexpr int kMTile = 4;

#include "simd_impl.inc"

}  // namespace

void int8_linear_f32_neon(const QuantProblem& p, int64_t n_begin, int64_t n_end) { int8_linear(p, n_begin, n_end); }
void int4_linear_f32_neon(const QuantProblem& p, int64_t n_begin, int64_t n_end) { int4_linear(p, n_begin, n_end); }
void int8_dequantize_f32_neon(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  int8_dequantize(p, n_begin, n_end);
}
void int4_dequantize_f32_neon(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  int4_dequantize(p, n_begin, n_end);
}

}  // namespace prism
