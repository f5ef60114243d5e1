// AVX2 segment means: simd_impl.inc on the ISA's vector layer.
#include <cstdint>

#include "segment_means.h"
#include "simd/avx2.h"

namespace prism {
namespace {

using namespace simd_avx2;

constexpr int kColVecs = 8;  // column vectors accumulated at once (registers to spare)

#include "simd_impl.inc"

}  // namespace

void segment_means_f32_avx2(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end) {
  segment_means(a, seg_begin, seg_end);
}

}  // namespace prism
