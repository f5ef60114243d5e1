// AVX2 masked softmax: simd_impl.inc on the ISA's vector layer.
#include <cstdint>

#include "masked_softmax.h"
#include "simd/avx2.h"

namespace prism {
namespace {

using namespace simd_avx2;

constexpr int kBlockVecs = 4;  // vectors per online-softmax step (their logits stay in registers)
constexpr int kRowVecs = 8;   // rows up to this many vectors are held in registers whole

#define PRISM_UNROLL _Pragma("GCC unroll 16")
#include "simd_impl.inc"
#undef PRISM_UNROLL

}  // namespace

void masked_softmax_f32_avx2(const SoftmaxRows& rows) { masked_softmax(rows); }

}  // namespace prism
