// AVX2+FMA compressed attention: the tiled kernel of simd_impl.inc on 8-lane
// vectors. 16 ymm registers: score tiles of 6 keys x 16 queries and P.V tiles
// of 6 queries x 16 columns keep 12 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/avx2.h"

namespace prism {
namespace {

using namespace simd_avx2;

constexpr int kQVecs = 2;
constexpr int kScoreKeys = 6;
constexpr int kPvRows = 6;
constexpr int kPvAccumulators = 12;
constexpr int kPvVecs = 2;

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_avx2(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
