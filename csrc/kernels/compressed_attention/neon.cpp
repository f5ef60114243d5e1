// NEON (AArch64) compressed attention: the tiled kernel of simd_impl.inc on 4-lane
// vectors. 32 q registers: score tiles of 6 keys x 16 queries and P.V
// tiles of 6 queries x 16 columns keep 24 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/neon.h"

namespace prism {
namespace {

using namespace simd_neon;

constexpr int kQVecs = 4;
constexpr int kScoreKeys = 6;
constexpr int kPvRows = 6;
constexpr int kPvAccumulators = 24;
constexpr int kPvVecs = 4;

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_neon(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
