// NEON masked softmax: simd_impl.inc on the ISA's vector layer.
#include <cstdint>

#include "masked_softmax.h"
#include "simd/neon.h"

namespace prism {
namespace {

using namespace simd_neon;

constexpr int kBlockVecs = 4;  // vectors per online-softmax step (their logits stay in registers)
constexpr int kRowVecs = 16;   // rows up to this many vectors are held in registers whole

#define PRISM_UNROLL _Pragma("GCC unroll 16")
#include "simd_impl.inc"
#undef PRISM_UNROLL

}  // namespace

void masked_softmax_f32_neon(const SoftmaxRows& rows) { masked_softmax(rows); }

}  // namespace prism
