#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/compressed_attention/compressed_attention.h"
#include "kernels/masked_softmax/masked_softmax.h"
#include "kernels/quantized_linear/quantized_linear.h"
#include "kernels/segment_means/segment_means.h"
#include "threadpool.h"

namespace prism {
namespace {

// Checks run on every call: the message is a literal, or built only once the
// check has failed (formatting it eagerly cost more than small kernels).
void require(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}
[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// What each driver last ran (an Isa value; -1 before its first call), as the
// switch below picked it: `prism info` reports this, not what the CPU offers.
std::atomic<int> dispatched[kKernelCount] = {-1, -1, -1, -1, -1, -1, -1};

void record(Kernel kernel, Isa isa) {
  dispatched[static_cast<int>(kernel)].store(static_cast<int>(isa), std::memory_order_relaxed);
}

// Picks the kernel of one family for an ISA; every family has the same four.
#if PRISM_HAVE_AVX2
#define PRISM_CASE_AVX2(fn, k) case Isa::avx2: record(k, Isa::avx2); return fn##_avx2;
#else
#define PRISM_CASE_AVX2(fn, k)
#endif
#if PRISM_HAVE_AVX512
#define PRISM_CASE_AVX512(fn, k) case Isa::avx512: record(k, Isa::avx512); return fn##_avx512;
#else
#define PRISM_CASE_AVX512(fn, k)
#endif
#if PRISM_HAVE_NEON
#define PRISM_CASE_NEON(fn, k) case Isa::neon: record(k, Isa::neon); return fn##_neon;
#else
#define PRISM_CASE_NEON(fn, k)
#endif
#define PRISM_SELECT(fn, isa, k)                                                       \
  do {                                                                                 \
    if (!isa_available(isa)) fail(std::string("isa: '") + isa_name(isa) + "' is not available"); \
    switch (isa) {                                                                     \
      PRISM_CASE_AVX2(fn, k) PRISM_CASE_AVX512(fn, k) PRISM_CASE_NEON(fn, k)           \
      default: record(k, Isa::serial); return fn##_serial;                             \
    }                                                                                  \
  } while (0)

using SegmentMeansFn = void (*)(const SegmentMeansArgs&, int64_t, int64_t);
using AttentionFn = void (*)(const AttentionHead&, int64_t, int64_t);
using SoftmaxFn = void (*)(const SoftmaxRows&);

SegmentMeansFn select_segment_means(Isa isa) { PRISM_SELECT(segment_means_f32, isa, Kernel::segment_means); }
AttentionFn select_attention(Isa isa) { PRISM_SELECT(compressed_attention_f32, isa, Kernel::compressed_attention); }
SoftmaxFn select_softmax(Isa isa) { PRISM_SELECT(masked_softmax_f32, isa, Kernel::masked_softmax); }
using QuantFn = void (*)(const QuantProblem&, int64_t, int64_t);
QuantFn select_int8_linear(Isa isa) { PRISM_SELECT(int8_linear_f32, isa, Kernel::int8_linear); }
QuantFn select_int4_linear(Isa isa) { PRISM_SELECT(int4_linear_f32, isa, Kernel::int4_linear); }
QuantFn select_int8_dequantize(Isa isa) { PRISM_SELECT(int8_dequantize_f32, isa, Kernel::int8_dequantize); }
QuantFn select_int4_dequantize(Isa isa) { PRISM_SELECT(int4_dequantize_f32, isa, Kernel::int4_dequantize); }

// Work-based thread split: a task carries at least kMinTaskNs of work (as
// estimated for the fastest ISA), so waking a worker -- a few µs, far more on
// a busy machine, where a worker preempted in the middle of its task holds the
// caller for a time slice -- costs little against the work it takes over;
// smaller problems run on the caller alone.
constexpr double kMinTaskNs = 50000.0;
constexpr double kSegmentMeansNsPerElement = 0.08;  // x elements, streamed from L2
constexpr int64_t kSegmentMeansColumns = 256;       // columns per segment-means work item
constexpr double kAttentionNsPerFlop = 0.012;       // ~80 GFLOP/s on one core
constexpr double kSoftmaxNsPerElement = 0.3;
// Quantized linear: per weight, its conversion (~0.1 ns streamed from
// memory) plus ~0.03 ns per input row; dequantize: ~0.1 ns per weight.
constexpr double kQuantNsPerWeight = 0.1;
constexpr double kQuantNsPerMac = 0.03;

// Items per task for items of `elements_per_item` elements at `ns_per_element`.
int64_t rows_per_task(int64_t items, int64_t elements_per_item, double ns_per_element) {
  const double item_ns = static_cast<double>(elements_per_item) * ns_per_element;
  const double per_task = std::ceil(kMinTaskNs / std::max(item_ns, 1e-3));
  // Less than two tasks' worth stays whole: a small second task is all
  // hand-off, and its thread may not even be on a core yet.
  if (2.0 * per_task > static_cast<double>(items)) return items;
  return std::max<int64_t>(1, static_cast<int64_t>(per_task));
}

// log(counts) as additive key bias; counts must be finite and >= 0.
std::vector<float> key_bias_from_counts(const float* counts, int64_t n) {
  std::vector<float> bias(n);
  for (int64_t j = 0; j < n; ++j) {
    const float c = counts[j];
    if (!(std::isfinite(c) && c >= 0.0f))
      fail("counts: every count must be finite and >= 0, got " + std::to_string(c) + " at index " +
                         std::to_string(j));
    bias[j] = c > 0.0f ? std::log(c) : -std::numeric_limits<float>::infinity();
  }
  return bias;
}

// The shape checks every quantized driver shares; int4 also needs an even
// group dividing K (so K is even and a row is K / 2 whole bytes).
void check_quant(const QuantProblem& p, bool int4, bool linear) {
  require(p.N >= 1 && p.K >= 1, "q: needs at least one row and one column");
  if (linear) require(p.M >= 0, "x: the row count must be >= 0");
  if (int4) {
    if (p.group < 2 || p.group % 2 != 0 || p.K % p.group != 0)
      fail("group: must be even and divide K = " + std::to_string(p.K) + ", got " + std::to_string(p.group));
    require(p.offset != nullptr, "offset: required for int4 weights");
  }
}

// Rows of N split over the pool; each row is computed whole by one thread.
void quant_rows(const QuantProblem& p, QuantFn fn, double ns_per_row) {
  const int64_t grain = rows_per_task(p.N, 1, ns_per_row);
  parallel_for(p.N, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

}  // namespace

void int8_linear_f32(const QuantProblem& p, Isa isa) {
  check_quant(p, false, true);
  const QuantFn fn = select_int8_linear(isa);
  if (p.M == 0) return;
  quant_rows(p, fn, static_cast<double>(p.K) * (kQuantNsPerWeight + kQuantNsPerMac * static_cast<double>(p.M)));
}

void int4_linear_f32(const QuantProblem& p, Isa isa) {
  check_quant(p, true, true);
  const QuantFn fn = select_int4_linear(isa);
  if (p.M == 0) return;
  quant_rows(p, fn, static_cast<double>(p.K) * (kQuantNsPerWeight + kQuantNsPerMac * static_cast<double>(p.M)));
}

void int8_dequantize_f32(const QuantProblem& p, Isa isa) {
  check_quant(p, false, false);
  quant_rows(p, select_int8_dequantize(isa), static_cast<double>(p.K) * kQuantNsPerWeight);
}

void int4_dequantize_f32(const QuantProblem& p, Isa isa) {
  check_quant(p, true, false);
  quant_rows(p, select_int4_dequantize(isa), static_cast<double>(p.K) * kQuantNsPerWeight);
}

int last_dispatched_isa(Kernel kernel) { return dispatched[static_cast<int>(kernel)].load(std::memory_order_relaxed); }

void segment_means_f32(const SegmentMeansProblem& p, Isa isa) {
  if (p.seg < 1) fail("seg: must be >= 1, got " + std::to_string(p.seg));
  require(p.L >= 0 && p.n >= 1 && p.d >= 1, "x: needs at least one row and one column");
  const SegmentMeansFn fn = select_segment_means(isa);
  // seg > n is one segment of n rows; clamping first keeps seg * d and
  // n + seg from overflowing (seg may be up to INT64_MAX).
  const int64_t seg = std::min(p.seg, p.n);
  const int64_t m = p.n / seg + (p.n % seg != 0);
  // Work items are (batch, segment, column chunk): a few long segments still
  // split over threads. The chunk that starts at column 0 writes the count.
  const int64_t cols = std::min<int64_t>(p.d, kSegmentMeansColumns);
  const int64_t chunks = (p.d + cols - 1) / cols;
  const int64_t grain = rows_per_task(p.L * m * chunks, seg * cols, kSegmentMeansNsPerElement);
  parallel_for(p.L * m * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (m * chunks), s = item / chunks % m, c0 = item % chunks * cols;
      SegmentMeansArgs a{p.x + b * p.x_batch_stride + c0, p.valid ? p.valid + b * p.n : nullptr,
                         p.means + b * m * p.d + c0, c0 == 0 ? p.counts + b * m : nullptr,
                         p.n, std::min(cols, p.d - c0), seg, p.x_row_stride, p.d};
      fn(a, s, s + 1);
    }
  });
}

void compressed_attention_f32(const AttentionProblem& p, Isa isa) {
  require(p.nq >= 1 && p.nk >= 1 && p.dh >= 1, "q: nq, nk and dh must be >= 1");
  require(p.counts_batches == 1 || p.counts_batches == p.B, "counts: batch must be 1 or B");
  require(p.pos_batches == 1 || p.pos_batches == p.B, "q_pos: batch must be 1 or B");
  require((p.q_pos == nullptr) == (p.k_pos == nullptr), "q_pos: q_pos and k_pos go together");
  const AttentionFn fn = select_attention(isa);
  std::vector<float> bias;
  if (p.counts) bias = key_bias_from_counts(p.counts, p.counts_batches * p.nk);
  // Query blocks small enough to spread (B, H) = (1, 1) over the pool, large
  // enough to reuse each key block across several queries.
  const int64_t qblock = 64;  // avx512's whole chunk (2 sub-blocks of 32): one pass over K/V per 64 queries
  const int64_t qblocks = (p.nq + qblock - 1) / qblock;
  const int64_t grain = rows_per_task(p.B * p.H * qblocks, 4 * qblock * p.nk * p.dh, kAttentionNsPerFlop);
  parallel_for(p.B * p.H * qblocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qblocks, qb = t % qblocks;
      const int64_t b = bh / p.H, hh = bh % p.H;
      AttentionHead h;
      h.q = p.q + b * p.q_strides[0] + hh * p.q_strides[1];
      h.k = p.k + b * p.k_strides[0] + hh * p.k_strides[1];
      h.v = p.v + b * p.v_strides[0] + hh * p.v_strides[1];
      h.out = p.out + b * p.out_strides[0] + hh * p.out_strides[1];
      h.key_bias = p.counts ? bias.data() + (p.counts_batches == 1 ? 0 : b) * p.nk : nullptr;
      const int64_t pb = p.pos_batches == 1 ? 0 : b;
      h.q_pos = p.q_pos ? p.q_pos + pb * p.nq : nullptr;
      h.k_pos = p.k_pos ? p.k_pos + pb * p.nk : nullptr;
      h.nq = p.nq;
      h.nk = p.nk;
      h.dh = p.dh;
      h.q_stride = p.q_strides[2];
      h.k_stride = p.k_strides[2];
      h.v_stride = p.v_strides[2];
      h.out_stride = p.out_strides[2];
      h.scale = p.scale;
      fn(h, qb * qblock, std::min(p.nq, (qb + 1) * qblock));
    }
  });
}

void masked_softmax_f32(const SoftmaxProblem& p, Isa isa) {
  require(p.lead_ndim >= 0 && p.lead_ndim <= 8, "scores: at most 10 dimensions");
  require(p.nq >= 1 && p.nk >= 1, "scores: the last two dimensions must be >= 1");
  require((p.q_pos == nullptr) == (p.k_pos == nullptr), "q_pos: q_pos and k_pos go together");
  const int64_t batch0 = p.lead_ndim > 0 ? p.lead[0] : 1;
  require(p.counts_batches == 1 || p.counts_batches == batch0, "counts: batch must be 1 or scores.shape[0]");
  require(p.pos_batches == 1 || p.pos_batches == batch0, "q_pos: batch must be 1 or scores.shape[0]");
  const SoftmaxFn fn = select_softmax(isa);
  std::vector<float> bias;
  if (p.counts) bias = key_bias_from_counts(p.counts, p.counts_batches * p.nk);
  int64_t lead_total = 1, inner = 1;  // inner: lead elements per first-dim index
  for (int64_t i = 0; i < p.lead_ndim; ++i) lead_total *= p.lead[i];
  if (p.lead_ndim > 0) inner = lead_total / p.lead[0];
  const int64_t rows = lead_total * p.nq;
  const bool bias_hides = std::find(bias.begin(), bias.end(), -std::numeric_limits<float>::infinity()) != bias.end();
  // Rows are split where a leading index ends: within one, every side input
  // advances by a fixed stride, so the kernel has no per-row set-up.
  parallel_for(rows, rows_per_task(rows, p.nk, kSoftmaxNsPerElement), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(softmax_scratch_floats(p.nk)));
    while (begin < end) {
      const int64_t li = begin / p.nq, qi = begin % p.nq, n = std::min(end - begin, p.nq - qi);
      const int64_t b0 = p.lead_ndim > 0 ? li / inner : 0;
      SoftmaxRows r;
      r.scores = p.scores + begin * p.nk;
      r.out = p.out + begin * p.nk;
      r.key_bias = p.counts ? bias.data() + (p.counts_batches == 1 ? 0 : b0) * p.nk : nullptr;
      r.key_bias_hides = bias_hides;
      r.add_mask = nullptr;
      r.mask_row_stride = r.mask_key_stride = 0;
      if (p.add_mask) {
        int64_t off = 0, rem = li;
        for (int64_t dim = p.lead_ndim - 1; dim >= 0; --dim) {
          off += (rem % p.lead[dim]) * p.mask_strides[dim];
          rem /= p.lead[dim];
        }
        r.mask_row_stride = p.mask_strides[p.lead_ndim];
        r.mask_key_stride = p.mask_strides[p.lead_ndim + 1];
        r.add_mask = p.add_mask + off + qi * r.mask_row_stride;
      }
      const int64_t pb = p.pos_batches == 1 ? 0 : b0;
      r.k_pos = p.k_pos ? p.k_pos + pb * p.nk : nullptr;
      r.q_pos = p.q_pos ? p.q_pos + pb * p.nq + qi : nullptr;
      r.rows = n;
      r.nk = p.nk;
      r.scratch = scratch.data();
      fn(r);
      begin += n;
    }
  });
}

}  // namespace prism
