// AVX-512F compressed attention: the tiled kernel of simd_impl.inc on 16-lane
// vectors. 32 zmm registers: score tiles of 8 keys x 32 queries and P.V tiles
// of 8 queries x 32 columns keep 16 accumulators plus operands in registers.
#include "compressed_attention.h"
#include "simd/avx512.h"

// GCC 12's avx512fintrin.h initialises its undefined-vector placeholders with
// themselves, which -Wmaybe-uninitialized reports once inlined here (GCC bug
// 105593, fixed in GCC 13); the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace prism {
namespace {

using namespace simd_avx512;

constexpr int kQVecs = 2;
constexpr int kScoreKeys = 8;
constexpr int kPvRows = 8;
constexpr int kPvAccumulators = 24;
constexpr int kPvVecs = 2;

#include "simd_impl.inc"

}  // namespace

void compressed_attention_f32_avx512(const AttentionHead& h, int64_t q_begin, int64_t q_end) {
  attention(h, q_begin, q_end);
}

}  // namespace prism
