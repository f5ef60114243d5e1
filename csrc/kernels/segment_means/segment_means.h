// Segment means: x[n, d] cut into consecutive segments of `seg` rows (the last
// may be shorter); means[s] is the mean of segment s's valid rows and
// counts[s] how many there were. A segment with no valid row gets count 0 and
// a zero mean.
//
// Accuracy: a float32 running sum stops growing once it is 2**24 times the
// rows it adds (the mean of 2**25 ones would be 0.5). Every path therefore
// sums a column in blocks of kSegmentMeansBlock rows: the rows of a block in
// order into a float32 lane (as fast as a plain float32 sum), each block's sum
// added into a float64 total. mean = float(total) * float(1 / count). A
// segment of at most one block is the plain float32 sum (float(total) is that
// sum exactly), so short segments cost nothing extra; every ISA follows the
// same order, so all paths agree bit for bit. Error: within
// (kSegmentMeansBlock + 3) units of float32 roundoff of mean |x|, whatever
// the length.
#pragma once
#include <cstdint>

namespace prism {

constexpr int64_t kSegmentMeansBlock = 256;  // rows per float32 partial sum

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
