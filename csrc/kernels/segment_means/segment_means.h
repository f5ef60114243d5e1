// Segment means: x[n, d] cut into consecutive segments of `seg` rows (the last
// may be shorter); means[s] is the mean of segment s's valid rows and
// counts[s] how many there were. A segment with no valid row gets count 0 and
// a zero mean.
#pragma once
#include <cstdint>

namespace prism {

struct SegmentMeansArgs {
  const float* x;        // [n, d], row stride x_stride
  const uint8_t* valid;  // [n] or nullptr (all rows valid)
  float* means;          // [ceil(n / seg), d], row stride means_stride
  float* counts;         // [ceil(n / seg)], or nullptr (another call writes them)
  int64_t n, d, seg, x_stride, means_stride;
};

// Computes segments [seg_begin, seg_end).
#define PRISM_SEGMENT_MEANS_DECL(isa) \
  void segment_means_f32_##isa(const SegmentMeansArgs& a, int64_t seg_begin, int64_t seg_end);
PRISM_SEGMENT_MEANS_DECL(serial)
PRISM_SEGMENT_MEANS_DECL(avx2)
PRISM_SEGMENT_MEANS_DECL(avx512)
PRISM_SEGMENT_MEANS_DECL(neon)
#undef PRISM_SEGMENT_MEANS_DECL

}  // namespace prism
