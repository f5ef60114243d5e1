// C++ unit tests of the kernel drivers in csrc/ops.h. Self-contained (no
// gtest) so the same file cross-compiles for aarch64 and runs under qemu.
//
// Every ISA available at run time runs every case and is compared with the
// serial ISA and with a float64 reference computed here. Shapes are chosen to
// hit each vector block and tail of every ISA (8/32 columns for AVX2, 16/64 for
// AVX-512, 4/16 for NEON): n not divisible by seg, n < seg, nk = 1, dh in
// {1, 7, 8, 16, 32, 64, 80, 128} (the whole-row P.V tiles at 2W and 4W), rows
// held in registers and rows in online blocks, logits near 90, odd sizes, batch > 1, counts 0, fully masked rows,
// positions, extreme logits and broadcast masks. Output buffers carry guard
// elements that must come back untouched.
//
// Tolerances (u = 2^-24, the float32 unit roundoff), all worst-case bounds so
// no test is flaky, yet far below the O(0.1) error of a masking or indexing bug:
// - segment_means: every ISA adds the rows of a column in row order, one lane
//   per column, in float32 blocks of B = kSegmentMeansBlock rows flushed into
//   a float64 total, so SIMD and serial must agree bit for bit; against
//   float64 a mean of c rows is within (min(c, B) + 2)*u of the exact one
//   relative to mean |x| (a block's float32 sum, then float(total), 1/c and
//   the product). Long segments (2**25 rows) must come out exact where every
//   block sum is exact.
// - masked_softmax: the logits z are formed in the same float32 order by every
//   ISA; what differs is exp (exp_ps ~2 ulp vs std::exp) and the order of the
//   row sum (relative error <= nk*u for positive terms), so rtol = 2(nk+8)u,
//   about 1e-5 at nk = 80. Against float64, the float32 rounding of z adds
//   2u*|z| per logit when a bias or mask is added (none otherwise).
// - compressed_attention: the same exp/sum terms plus the logits, which SIMD
//   paths may sum in another order (and with FMA): a dot product of dh terms
//   is within dh*u*sum|q_c k_c| of exact. The "exact" cases use small integer
//   q, k and a power-of-two scale so every logit is exact in any order; there
//   only the bias rounding remains. Errors are bounded relative to max|v|
//   since out is a convex combination of v rows (which may cancel).
//
// Usage: test_kernels [group ...]; groups: isa segment_means segment_means_long
// compressed_attention masked_softmax threadpool thread_split quantized_linear bad_args (default: all).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "isa.h"
#include "kernels/segment_means/segment_means.h"
#include "ops.h"
#include "threadpool.h"

namespace {

using prism::Isa;

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff
constexpr float kGuard = 1234.5f;       // value of the guard elements
constexpr int64_t kGuardLen = 19;
const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

int g_failures = 0;
long g_checks = 0;

void fail(const std::string& what) {
  ++g_failures;
  if (g_failures <= 40) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  if (g_failures == 40) std::fprintf(stderr, "(further failures not printed)\n");
}

#define EXPECT(cond, what)                                                                 \
  do {                                                                                     \
    ++g_checks;                                                                            \
    if (!(cond)) fail(std::string(what) + ": expected " #cond " (line " + std::to_string(__LINE__) + ")"); \
  } while (0)

// got[i] vs want[i]: |got - want| <= atol + rtol * |want|; a NaN must meet a
// NaN and an infinity the same infinity. Reports the worst element.
template <typename W>
void expect_close(const float* got, const W* want, int64_t n, double rtol, double atol, const std::string& what) {
  ++g_checks;
  int64_t worst = -1;
  double worst_excess = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got[i], w = static_cast<double>(want[i]);
    double excess;
    if (std::isnan(w) || std::isnan(g))
      excess = std::isnan(w) && std::isnan(g) ? 0.0 : kInf;
    else if (std::isinf(w) || std::isinf(g))
      excess = g == w ? 0.0 : kInf;
    else
      excess = std::fabs(g - w) - (atol + rtol * std::fabs(w));
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  if (worst >= 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, ": element %lld of %lld is %.9g, expected %.9g (rtol %.3g, atol %.3g)",
                  static_cast<long long>(worst), static_cast<long long>(n), got[worst],
                  static_cast<double>(want[worst]), rtol, atol);
    fail(what + buf);
  }
}

// A float buffer of n elements followed by kGuardLen guard elements.
struct Guarded {
  std::vector<float> buf;
  explicit Guarded(int64_t n, float fill = kNaN) : buf(n + kGuardLen, kGuard) {
    std::fill(buf.begin(), buf.begin() + n, fill);
  }
  float* data() { return buf.data(); }
  bool guard_intact() const {
    for (size_t i = buf.size() - kGuardLen; i < buf.size(); ++i)
      if (buf[i] != kGuard) return false;
    return true;
  }
};

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
  int64_t randint(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }  // [lo, hi]
  bool chance(double p) { return std::bernoulli_distribution(p)(gen); }
};

std::string unavailable_reason(Isa isa) {
  const prism::CpuFeatures& f = prism::cpu_features();
  switch (isa) {
    case Isa::avx2:
      if (!(f.avx2 && f.fma)) return "the CPU lacks AVX2+FMA";
      if (!f.os_avx) return "the OS does not enable YMM state";
      break;
    case Isa::avx512:
      if (!(f.avx512f && f.fma)) return "the CPU lacks AVX-512F";
      if (!f.os_avx512) return "the OS does not enable ZMM/opmask state";
      break;
    case Isa::neon:
      if (!f.neon) return "the CPU has no AArch64 Advanced SIMD";
      break;
    case Isa::serial:
      break;
  }
  return "not compiled into this build (other architecture, or PRISM_SIMD=OFF)";
}

std::string tag(const char* family, Isa isa, const std::string& shape) {
  return std::string(family) + "[" + prism::isa_name(isa) + "] " + shape;
}

// ---------------------------------------------------------------- isa

void test_isa() {
  const std::vector<Isa> avail = prism::available_isas();
  EXPECT(!avail.empty() && avail.front() == Isa::serial, "serial is always available");
  EXPECT(prism::active_isa() == avail.back(), "the active ISA is the best available one");
  for (Isa isa : {Isa::serial, Isa::avx2, Isa::avx512, Isa::neon}) {
    EXPECT(prism::isa_from_name(prism::isa_name(isa)) == isa, std::string("name round trip of ") + prism::isa_name(isa));
    const bool listed = std::find(avail.begin(), avail.end(), isa) != avail.end();
    EXPECT(listed == prism::isa_available(isa), std::string("available_isas agrees for ") + prism::isa_name(isa));
  }
  for (Isa isa : avail) {
    prism::force_isa(isa);
    EXPECT(prism::isa_is_forced() && prism::active_isa() == isa, std::string("force_isa ") + prism::isa_name(isa));
  }
  prism::clear_forced_isa();
  EXPECT(!prism::isa_is_forced() && prism::active_isa() == avail.back(), "clear_forced_isa");
}

// ---------------------------------------------------------------- segment means

struct SegCase {
  int64_t L, n, d, seg, pad;
  int valid_mode;  // 0: no mask, 1: random rows, 2: random and whole segments invalid, 3: all invalid
};

void run_segment_case(const SegCase& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t m = (c.n + c.seg - 1) / c.seg;
  const int64_t row_stride = c.d + c.pad, batch_stride = c.n * row_stride + c.pad;
  std::vector<float> x(c.L * batch_stride, kNaN);  // padding stays NaN: it must never be read
  std::vector<uint8_t> valid(c.L * c.n, 1);
  for (int64_t b = 0; b < c.L; ++b)
    for (int64_t r = 0; r < c.n; ++r) {
      uint8_t& v = valid[b * c.n + r];
      if (c.valid_mode == 1 || c.valid_mode == 2) v = rng.chance(0.7) ? 1 : 0;
      if (c.valid_mode == 2 && (r / c.seg) % 3 == 1) v = 0;
      if (c.valid_mode == 3) v = 0;
      float* row = &x[b * batch_stride + r * row_stride];
      for (int64_t k = 0; k < c.d; ++k) row[k] = v ? rng.uniform(-4.0f, 4.0f) : kNaN;  // invalid rows must be skipped
    }
  const bool masked = c.valid_mode != 0;

  // float64 reference and its error bound (a float32 sum of cnt terms).
  std::vector<double> ref_means(c.L * m * c.d, 0.0), bound(c.L * m * c.d, 0.0);
  std::vector<float> ref_counts(c.L * m, 0.0f);
  for (int64_t b = 0; b < c.L; ++b)
    for (int64_t s = 0; s < m; ++s) {
      int64_t cnt = 0;
      for (int64_t r = s * c.seg; r < std::min(c.n, (s + 1) * c.seg); ++r) {
        if (!valid[b * c.n + r]) continue;
        ++cnt;
        for (int64_t k = 0; k < c.d; ++k) {
          const double v = x[b * batch_stride + r * row_stride + k];
          ref_means[(b * m + s) * c.d + k] += v;
          bound[(b * m + s) * c.d + k] += std::fabs(v);
        }
      }
      ref_counts[b * m + s] = static_cast<float>(cnt);
      for (int64_t k = 0; cnt && k < c.d; ++k) {
        ref_means[(b * m + s) * c.d + k] /= cnt;
        bound[(b * m + s) * c.d + k] *= (std::min(cnt, prism::kSegmentMeansBlock) + 2) * kU / cnt;
      }
    }

  char shape[160];
  std::snprintf(shape, sizeof shape, "L=%lld n=%lld d=%lld seg=%lld pad=%lld valid_mode=%d", (long long)c.L,
                (long long)c.n, (long long)c.d, (long long)c.seg, (long long)c.pad, c.valid_mode);
  std::vector<float> serial_means;
  for (Isa isa : prism::available_isas()) {
    const std::string what = tag("segment_means", isa, shape);
    Guarded means(c.L * m * c.d), counts(c.L * m);
    prism::SegmentMeansProblem p{x.data(), masked ? valid.data() : nullptr, means.data(), counts.data(),
                                 c.L, c.n, c.d, c.seg, batch_stride, row_stride};
    prism::segment_means_f32(p, isa);
    EXPECT(prism::last_dispatched_isa(prism::Kernel::segment_means) == static_cast<int>(isa),
           what + ": the dispatch records the ISA that ran");
    EXPECT(means.guard_intact() && counts.guard_intact(), what + ": writes stay inside the outputs");
    expect_close(counts.data(), ref_counts.data(), c.L * m, 0.0, 0.0, what + ": counts");
    ++g_checks;
    for (int64_t i = 0; i < c.L * m * c.d; ++i)
      if (!(std::fabs(means.buf[i] - ref_means[i]) <= bound[i])) {
        fail(what + ": mean " + std::to_string(i) + " = " + std::to_string(means.buf[i]) + ", float64 reference " +
             std::to_string(ref_means[i]));
        break;
      }
    if (isa == Isa::serial) {
      serial_means.assign(means.buf.begin(), means.buf.begin() + c.L * m * c.d);
    } else {
      ++g_checks;
      if (std::memcmp(means.data(), serial_means.data(), sizeof(float) * serial_means.size()) != 0)
        fail(what + ": means differ from the serial path (they must be bit-identical)");
    }
  }
}

void test_segment_means() {
  const int64_t ds[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 80, 128, 200};
  const int64_t n_seg[][2] = {{1, 1}, {5, 8}, {17, 4}, {16, 4}, {33, 1}, {7, 7}, {100, 16}, {64, 5}, {3, 2}};
  uint64_t seed = 1;
  int idx = 0;
  for (int64_t d : ds)
    for (const auto& ns : n_seg)
      for (int valid_mode = 0; valid_mode < 4; ++valid_mode, ++idx)
        if (idx % 2 == 0 || valid_mode == 0)  // every shape unmasked, half of them masked too
          run_segment_case({1 + idx % 3, ns[0], d, ns[1], (idx % 5 == 0) ? 3 : 0, valid_mode}, seed++);
  // Large enough to be split over the thread pool, with a short last segment.
  run_segment_case({2, 1000, 768, 7, 0, 0}, seed++);
  run_segment_case({3, 999, 200, 16, 5, 1}, seed++);
  // Segments of many blocks (a block and one row, many blocks and a ragged
  // last one), every column path, masked and not.
  run_segment_case({1, 2 * prism::kSegmentMeansBlock + 2, 149, prism::kSegmentMeansBlock + 1, 0, 0}, seed++);
  run_segment_case({2, 20000, 149, 7000, 3, 0}, seed++);
  run_segment_case({1, 20000, 37, 9000, 0, 1}, seed++);
  run_segment_case({1, 30011, 21, 30011, 2, 2}, seed++);
}

// Means that must come out exact: every block sum is exact in float32, so
// only the float64 total can lose them. A float32 running sum stops growing
// at 2**24 rows of ones (the mean of 2**25 came out 0.5), and drops the 2**-10
// of 1 + 2**-10 once it passes 2**15.
void run_exact_long_segment(int64_t n, int64_t d, float value, bool masked) {
  std::vector<float> x(n * d, value);
  std::vector<uint8_t> valid(n);
  int64_t cnt = 0;
  for (int64_t r = 0; r < n; ++r) cnt += valid[r] = masked ? (r % 3 != 1) : 1;
  char shape[96];
  std::snprintf(shape, sizeof shape, "n=%lld d=%lld value=%.9g masked=%d", (long long)n, (long long)d, value, masked);
  for (Isa isa : prism::available_isas()) {
    const std::string what = tag("segment_means long", isa, shape);
    Guarded means(d), counts(1);
    prism::SegmentMeansProblem p{x.data(), masked ? valid.data() : nullptr, means.data(), counts.data(), 1, n, d, n,
                                 n * d, d};
    prism::segment_means_f32(p, isa);
    EXPECT(means.guard_intact() && counts.guard_intact(), what + ": writes stay inside the outputs");
    EXPECT(counts.buf[0] == static_cast<float>(cnt), what + ": count (float32)");
    ++g_checks;
    for (int64_t k = 0; k < d; ++k)
      if (means.buf[k] != value) {
        fail(what + ": mean of column " + std::to_string(k) + " = " + std::to_string(means.buf[k]));
        break;
      }
  }
}

void test_segment_means_long() {
  run_exact_long_segment(int64_t{1} << 25, 1, 1.0f, false);
  run_exact_long_segment(int64_t{1} << 25, 1, 1.0f, true);
  run_exact_long_segment(int64_t{1} << 17, 149, 1.0f + 1.0f / 1024, false);  // every column path of every ISA
  run_exact_long_segment(int64_t{1} << 17, 149, 1.0f + 1.0f / 1024, true);
}

// ---------------------------------------------------------------- compressed attention

struct AttnCase {
  int64_t B, H, nq, nk, dh;
  int counts_mode;  // 0: none, 1: random with zeros, 2: and every count of batch 0 zero
  int pos_mode;     // 0: none, 1: random positions (some queries see nothing)
  bool batched_side;  // counts / positions per batch (else shared)
  int data_mode;    // 0: random reals, 1: exact integer logits up to ~+-100, 2: all logits equal (q = 0)
  int64_t pad;      // extra elements after each row
};

void run_attention_case(const AttnCase& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t rs = c.dh + c.pad;  // row stride of q, k, v, out
  const int64_t q_head = c.nq * rs, kv_head = c.nk * rs;
  std::vector<float> q(c.B * c.H * q_head, kNaN), k(c.B * c.H * kv_head, kNaN), v(c.B * c.H * kv_head, kNaN);
  float scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  if (c.data_mode == 1) scale = std::ldexp(1.0f, static_cast<int>(std::lround(std::log2(10.0 / std::sqrt(c.dh)))));
  for (int64_t t = 0; t < c.B * c.H; ++t) {
    for (int64_t i = 0; i < c.nq; ++i)
      for (int64_t e = 0; e < c.dh; ++e)
        q[t * q_head + i * rs + e] = c.data_mode == 0   ? rng.uniform(-1.0f, 1.0f)
                                     : c.data_mode == 1 ? static_cast<float>(rng.randint(-3, 3))
                                                        : 0.0f;
    for (int64_t j = 0; j < c.nk; ++j)
      for (int64_t e = 0; e < c.dh; ++e) {
        k[t * kv_head + j * rs + e] = c.data_mode == 1 ? static_cast<float>(rng.randint(-3, 3)) : rng.uniform(-1.0f, 1.0f);
        v[t * kv_head + j * rs + e] = rng.uniform(-1.0f, 1.0f);
      }
  }
  const int64_t side_batches = c.batched_side ? c.B : 1;
  std::vector<float> counts;
  if (c.counts_mode) {
    counts.resize(side_batches * c.nk);
    for (float& w : counts) w = rng.chance(0.25) ? 0.0f : 0.5f * static_cast<float>(rng.randint(1, 12));
    if (c.counts_mode == 2) std::fill(counts.begin(), counts.begin() + c.nk, 0.0f);
  }
  std::vector<int32_t> q_pos, k_pos;
  if (c.pos_mode) {
    q_pos.resize(side_batches * c.nq);
    k_pos.resize(side_batches * c.nk);
    for (int32_t& p : k_pos) p = static_cast<int32_t>(rng.randint(0, 2 * c.nk));
    for (int32_t& p : q_pos) p = static_cast<int32_t>(rng.randint(-2, 2 * c.nk + 1));
  }

  // float64 reference. For the bound: smax = max scale * sum_c |q_c k_c| (the
  // dot-product error scale), zmax = max |logit| and bmax = max |log count|.
  std::vector<double> ref(c.B * c.H * c.nq * c.dh, 0.0);
  std::vector<char> empty_row(c.B * c.H * c.nq, 0);
  double smax = 0.0, zmax = 0.0, bmax = 0.0, vmax = 0.0;
  for (float w : counts)
    if (w > 0) bmax = std::max(bmax, std::fabs(std::log(static_cast<double>(w))));
  for (float x : v) if (!std::isnan(x)) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
  std::vector<double> s(c.nk), acc(c.dh);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t t = b * c.H + h, sb = c.batched_side ? b : 0;
      for (int64_t i = 0; i < c.nq; ++i) {
        double mx = -kInf;
        for (int64_t j = 0; j < c.nk; ++j) {
          double dot = 0.0, dot_abs = 0.0;
          for (int64_t e = 0; e < c.dh; ++e) {
            const double prod = static_cast<double>(q[t * q_head + i * rs + e]) * k[t * kv_head + j * rs + e];
            dot += prod;
            dot_abs += std::fabs(prod);
          }
          smax = std::max(smax, dot_abs * scale);
          s[j] = dot * scale;
          zmax = std::max(zmax, std::fabs(s[j]));
          if (c.counts_mode) s[j] += std::log(static_cast<double>(counts[sb * c.nk + j]));  // log 0 = -inf
          if (c.pos_mode && k_pos[sb * c.nk + j] > q_pos[sb * c.nq + i]) s[j] = -kInf;
          mx = std::max(mx, s[j]);
        }
        double* o = &ref[(t * c.nq + i) * c.dh];
        if (mx == -kInf) {
          empty_row[t * c.nq + i] = 1;
          continue;
        }
        double sum = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < c.nk; ++j) {
          const double p = std::exp(s[j] - mx);
          sum += p;
          for (int64_t e = 0; e < c.dh; ++e) acc[e] += p * v[t * kv_head + j * rs + e];
        }
        for (int64_t e = 0; e < c.dh; ++e) o[e] = acc[e] / sum;
      }
    }
  // Logit error: the dot product (exact in data mode 1), then the rounding of
  // the float32 logit and bias; the weights exp(z - max) see twice that.
  const double logit_err = (c.data_mode == 1 ? 0.0 : c.dh * kU * smax) + 2.0 * kU * (zmax + bmax);
  const double atol = 2.0 * (4.0 * logit_err + 2.0 * (c.nk + 8) * kU) * vmax;

  char shape[200];
  std::snprintf(shape, sizeof shape, "B=%lld H=%lld nq=%lld nk=%lld dh=%lld counts=%d pos=%d batched=%d data=%d pad=%lld",
                (long long)c.B, (long long)c.H, (long long)c.nq, (long long)c.nk, (long long)c.dh, c.counts_mode,
                c.pos_mode, c.batched_side, c.data_mode, (long long)c.pad);
  std::vector<float> serial_out;
  for (Isa isa : prism::available_isas()) {
    const std::string what = tag("compressed_attention", isa, shape);
    Guarded out(c.B * c.H * q_head, kGuard);  // row padding of out must stay kGuard too
    prism::AttentionProblem p{};
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.counts = c.counts_mode ? counts.data() : nullptr;
    p.q_pos = c.pos_mode ? q_pos.data() : nullptr;
    p.k_pos = c.pos_mode ? k_pos.data() : nullptr;
    p.B = c.B, p.H = c.H, p.nq = c.nq, p.nk = c.nk, p.dh = c.dh;
    p.counts_batches = p.pos_batches = side_batches;
    const int64_t qs[3] = {c.H * q_head, q_head, rs}, ks[3] = {c.H * kv_head, kv_head, rs};
    std::copy(qs, qs + 3, p.q_strides);
    std::copy(qs, qs + 3, p.out_strides);
    std::copy(ks, ks + 3, p.k_strides);
    std::copy(ks, ks + 3, p.v_strides);
    p.scale = scale;
    prism::compressed_attention_f32(p, isa);
    EXPECT(prism::last_dispatched_isa(prism::Kernel::compressed_attention) == static_cast<int>(isa),
           what + ": the dispatch records the ISA that ran");

    std::vector<float> got(c.B * c.H * c.nq * c.dh);
    bool pad_intact = out.guard_intact();
    for (int64_t r = 0; r < c.B * c.H * c.nq; ++r) {
      std::copy(out.buf.begin() + r * rs, out.buf.begin() + r * rs + c.dh, got.begin() + r * c.dh);
      for (int64_t e = c.dh; e < rs; ++e) pad_intact &= out.buf[r * rs + e] == kGuard;
    }
    EXPECT(pad_intact, what + ": writes stay inside the output rows");
    bool zero_rows = true;
    for (int64_t r = 0; r < c.B * c.H * c.nq; ++r)
      for (int64_t e = 0; empty_row[r] && e < c.dh; ++e) zero_rows &= got[r * c.dh + e] == 0.0f;
    EXPECT(zero_rows, what + ": a query with no visible key gets an exact zero row");
    expect_close(got.data(), ref.data(), static_cast<int64_t>(got.size()), 0.0, atol, what + " vs float64");
    if (isa == Isa::serial)
      serial_out = got;
    else
      expect_close(got.data(), serial_out.data(), static_cast<int64_t>(got.size()), 0.0, atol, what + " vs serial");
  }
}

void test_compressed_attention() {
  uint64_t seed = 1000;
  int idx = 0;
  // dh = 2W and 4W take the whole-row P.V tiles: 8, 16 (neon), 16, 32 (avx2),
  // 32, 64 (avx512); the others the generic column tiles.
  const int64_t dhs[] = {1, 7, 8, 16, 32, 64, 80, 128};
  const int64_t nq_nk[][2] = {{1, 1}, {3, 1}, {1, 5}, {7, 13}, {33, 64}, {17, 65}, {40, 130}, {64, 200}};
  for (int64_t dh : dhs)
    for (const auto& qk : nq_nk)
      for (int data_mode = 0; data_mode < 3; ++data_mode, ++idx) {
        if (data_mode == 2 && idx % 3) continue;  // the all-equal case needs few shapes
        AttnCase c{1 + idx % 2, 1 + (idx / 2) % 3, qk[0], qk[1], dh, idx % 3, (idx / 3) % 2,
                   (idx / 5) % 2 == 1, data_mode, (idx % 4 == 1) ? 5 : 0};
        run_attention_case(c, seed++);
      }
  // Several query blocks of 32 and key blocks of 64, split over the pool.
  run_attention_case({2, 3, 100, 300, 64, 1, 1, true, 0, 0}, seed++);
  run_attention_case({1, 2, 129, 257, 80, 2, 0, true, 1, 3}, seed++);
}

// ---------------------------------------------------------------- masked softmax

struct SoftmaxCase {
  std::vector<int64_t> lead;
  int64_t nq, nk;
  int counts_mode;  // 0: none, 1: random with zeros, 2: and every count of batch 0 zero
  int pos_mode;     // 0: none, 1: random positions
  bool batched_side;
  int mask_mode;    // 0: none, 1: full, 2: broadcast along keys, 3: one [nk] row for all, 4: last stride 2
  int logit_mode;   // 0: N(0, 3), 1: +-80, 2: +-1e30, 3: all equal, 4: some -inf, 5: a NaN in some rows,
                    // 6: in [86, 95] (exp would overflow without the max shift), some -inf
  bool in_place;
};

void run_softmax_case(const SoftmaxCase& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t lead_ndim = static_cast<int64_t>(c.lead.size());
  int64_t lead_total = 1;
  for (int64_t l : c.lead) lead_total *= l;
  const int64_t batch0 = lead_ndim ? c.lead[0] : 1, rows = lead_total * c.nq, total = rows * c.nk;
  const int64_t side_batches = c.batched_side ? batch0 : 1;

  std::vector<float> scores(total);
  const float equal_value = rng.uniform(-50.0f, 50.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c.nk; ++j) {
      float& z = scores[r * c.nk + j];
      switch (c.logit_mode) {
        case 0: z = 3.0f * rng.uniform(-1.7f, 1.7f); break;
        case 1: z = rng.chance(0.5) ? 80.0f - rng.uniform(0.0f, 1.0f) : -80.0f + rng.uniform(0.0f, 1.0f); break;
        case 2: z = rng.chance(0.5) ? 1e30f : -1e30f; break;
        case 3: z = equal_value; break;
        case 4: z = rng.chance(0.3) || r % 5 == 1 ? -kInf : rng.uniform(-5.0f, 5.0f); break;
        case 6: z = rng.chance(0.2) || r % 7 == 3 ? -kInf : rng.uniform(86.0f, 95.0f); break;
        default: z = r % 3 == 0 && j == (r / 3) % c.nk ? kNaN : rng.uniform(-5.0f, 5.0f); break;
      }
    }
  std::vector<float> counts;
  if (c.counts_mode) {
    counts.resize(side_batches * c.nk);
    for (float& w : counts) w = rng.chance(0.25) ? 0.0f : 0.5f * static_cast<float>(rng.randint(1, 12));
    if (c.counts_mode == 2) std::fill(counts.begin(), counts.begin() + c.nk, 0.0f);
  }
  std::vector<int32_t> q_pos, k_pos;
  if (c.pos_mode) {
    q_pos.resize(side_batches * c.nq);
    k_pos.resize(side_batches * c.nk);
    for (int32_t& p : k_pos) p = static_cast<int32_t>(rng.randint(-3, 2 * c.nk));
    for (int32_t& p : q_pos) p = static_cast<int32_t>(rng.randint(-4, 2 * c.nk + 1));
  }
  // The mask as a strided view over lead + (nq, nk); strides in elements.
  std::vector<int64_t> shape(c.lead);
  shape.push_back(c.nq);
  shape.push_back(c.nk);
  const int64_t ndim = lead_ndim + 2;
  std::vector<int64_t> mstrides(ndim, 0);
  int64_t mask_len = 0;
  if (c.mask_mode == 1 || c.mask_mode == 4) {
    const int64_t step = c.mask_mode == 4 ? 2 : 1;
    int64_t st = step;
    for (int64_t dim = ndim - 1; dim >= 0; --dim) mstrides[dim] = st, st *= shape[dim];
    mask_len = st;
  } else if (c.mask_mode == 2) {  // one value per (lead, q) row
    int64_t st = 1;
    for (int64_t dim = ndim - 2; dim >= 0; --dim) mstrides[dim] = st, st *= shape[dim];
    mask_len = st;
  } else if (c.mask_mode == 3) {  // one [nk] row for every row
    mstrides[ndim - 1] = 1;
    mask_len = c.nk;
  }
  std::vector<float> mask(mask_len);
  for (float& x : mask) x = rng.chance(0.15) ? -kInf : rng.uniform(-2.0f, 2.0f);

  // float64 reference (docs/errors.md): a hidden key (count 0, future
  // position) is -inf whatever its score, a NaN or +inf among the visible
  // logits makes the row NaN, none visible gives zeros.
  std::vector<double> ref(total);
  std::vector<double> zerr(rows, 0.0);  // float32 rounding of the logits of each row
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t li = r / c.nq, qi = r % c.nq;
    int64_t moff = qi * mstrides[lead_ndim], rem = li, b0 = 0;
    for (int64_t dim = lead_ndim - 1; dim >= 0; --dim) {
      moff += (rem % c.lead[dim]) * mstrides[dim];
      if (dim == 0) b0 = rem % c.lead[dim];
      rem /= c.lead[dim];
    }
    const int64_t sb = c.batched_side ? b0 : 0;
    double* z = &ref[r * c.nk];
    double mx = -kInf;
    bool bad = false;
    for (int64_t j = 0; j < c.nk; ++j) {
      const double s = scores[r * c.nk + j];
      double zj = s, mag = std::fabs(s);
      if (c.counts_mode) {
        const double w = counts[sb * c.nk + j];
        zj += std::log(w);
        if (w > 0) mag += std::fabs(std::log(w));
      }
      if (c.mask_mode) {
        const double mv = mask[moff + j * mstrides[ndim - 1]];
        zj += mv;
        if (std::isfinite(mv)) mag += std::fabs(mv);
      }
      if ((c.pos_mode && k_pos[sb * c.nk + j] > q_pos[sb * c.nq + qi]) ||
          (c.counts_mode && counts[sb * c.nk + j] == 0.0f))
        zj = -kInf;
      bad |= std::isnan(zj) || zj == kInf;
      if ((c.counts_mode || c.mask_mode) && std::isfinite(zj)) zerr[r] = std::max(zerr[r], 2.0 * kU * mag);
      z[j] = zj;
      mx = std::fmax(mx, zj);
    }
    if (bad || mx == -kInf) {
      std::fill(z, z + c.nk, bad ? std::numeric_limits<double>::quiet_NaN() : 0.0);
      continue;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < c.nk; ++j) sum += (z[j] = std::exp(z[j] - mx));
    for (int64_t j = 0; j < c.nk; ++j) z[j] /= sum;
  }
  const double rtol = 2.0 * (c.nk + 8) * kU;
  const double atol = std::numeric_limits<float>::min();  // exp_ps flushes subnormal results
  double max_zerr = 0.0;
  for (double e : zerr) max_zerr = std::max(max_zerr, e);

  std::string lead_str;
  for (int64_t l : c.lead) lead_str += std::to_string(l) + ",";
  char shape_str[220];
  std::snprintf(shape_str, sizeof shape_str,
                "lead=(%s) nq=%lld nk=%lld counts=%d pos=%d batched=%d mask=%d logits=%d in_place=%d",
                lead_str.c_str(), (long long)c.nq, (long long)c.nk, c.counts_mode, c.pos_mode, c.batched_side,
                c.mask_mode, c.logit_mode, c.in_place);
  std::vector<float> serial_out;
  for (Isa isa : prism::available_isas()) {
    const std::string what = tag("masked_softmax", isa, shape_str);
    Guarded out(total);
    std::vector<float> in = scores;  // the kernel must not modify its input unless in place
    if (c.in_place) std::copy(scores.begin(), scores.end(), out.buf.begin());
    prism::SoftmaxProblem p{};
    p.scores = c.in_place ? out.data() : in.data();
    p.out = out.data();
    p.counts = c.counts_mode ? counts.data() : nullptr;
    p.q_pos = c.pos_mode ? q_pos.data() : nullptr;
    p.k_pos = c.pos_mode ? k_pos.data() : nullptr;
    p.add_mask = c.mask_mode ? mask.data() : nullptr;
    p.lead_ndim = lead_ndim;
    std::copy(c.lead.begin(), c.lead.end(), p.lead);
    std::copy(mstrides.begin(), mstrides.end(), p.mask_strides);
    p.nq = c.nq;
    p.nk = c.nk;
    p.counts_batches = p.pos_batches = side_batches;
    prism::masked_softmax_f32(p, isa);
    EXPECT(prism::last_dispatched_isa(prism::Kernel::masked_softmax) == static_cast<int>(isa),
           what + ": the dispatch records the ISA that ran");

    EXPECT(out.guard_intact(), what + ": writes stay inside the output");
    if (!c.in_place) EXPECT(std::memcmp(in.data(), scores.data(), sizeof(float) * total) == 0, what + ": input untouched");
    bool finite_ok = true;  // no NaN/inf unless the input had a NaN
    for (int64_t i = 0; i < total && c.logit_mode != 5; ++i) finite_ok &= std::isfinite(out.buf[i]) != 0;
    EXPECT(finite_ok, what + ": output is finite");
    expect_close(out.data(), ref.data(), total, rtol + 4.0 * max_zerr, atol, what + " vs float64");
    if (isa == Isa::serial)
      serial_out.assign(out.buf.begin(), out.buf.begin() + total);
    else
      expect_close(out.data(), serial_out.data(), total, rtol, atol, what + " vs serial");
  }
}

void test_masked_softmax() {
  uint64_t seed = 5000;
  int idx = 0;
  // Up to 64 (avx2) or 256 (avx512, neon) keys a row is held in registers; longer
  // rows go by in online blocks of 4 vectors (ragged and whole last blocks).
  const int64_t nks[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100, 256, 257, 272, 320};
  const std::vector<std::vector<int64_t>> leads = {{}, {3}, {2, 3}, {2, 1, 2}};
  const int64_t nqs[] = {1, 3, 8};
  for (int64_t nk : nks)
    for (const auto& lead : leads)
      for (int logit_mode = 0; logit_mode < 7; ++logit_mode, ++idx) {
        SoftmaxCase c{lead, nqs[idx % 3], nk, idx % 3, (idx / 3) % 2, (idx / 2) % 2 == 1, (idx / 7) % 5,
                      logit_mode, idx % 4 == 3};
        if (logit_mode == 2) c.counts_mode = 0, c.mask_mode = 0;  // +-1e30 + log(count) is not exact in float32
        run_softmax_case(c, seed++);
      }
  // Many rows, split over the pool.
  run_softmax_case({{4, 12}, 64, 200, 1, 1, true, 1, 0, false}, seed++);
  run_softmax_case({{2, 3}, 77, 333, 2, 1, true, 2, 1, true}, seed++);
}

// ---------------------------------------------------------------- thread pool

// parallel_for(n, grain) must hand out every index of [0, n) exactly once, in
// chunks of >= grain items (except the last).
void check_cover(int64_t n, int64_t grain, const std::string& what) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  for (auto& h : hits) h.store(0);
  std::atomic<bool> bad_chunk{false};
  prism::parallel_for(n, grain, [&](int64_t b, int64_t e) {
    if (!(0 <= b && b < e && e <= n) || (e - b < grain && e != n)) bad_chunk = true;
    for (int64_t i = b; i < e && 0 <= b && e <= n; ++i) hits[i].fetch_add(1);
  });
  bool once = true;
  for (auto& h : hits) once &= h.load() == 1;
  EXPECT(once, what + ": every index exactly once");
  EXPECT(!bad_chunk, what + ": chunks inside [0, n) and >= grain");
}

void test_threadpool() {
  const int saved = prism::num_threads();
  for (int threads : {1, 3, 2}) {
    prism::set_num_threads(threads);
    EXPECT(prism::num_threads() == threads, "set_num_threads(" + std::to_string(threads) + ")");
    for (int64_t n : {0, 1, 2, 7, 100, 1000, 100003})
      for (int64_t grain : {1, 7, 64, 1000})
        check_cover(n, grain, "threads=" + std::to_string(threads) + " n=" + std::to_string(n) +
                                  " grain=" + std::to_string(grain));
  }
  prism::set_num_threads(3);

  // Nested calls run inline on the calling task and still cover everything.
  std::vector<std::atomic<int>> nested(64 * 50);
  for (auto& h : nested) h.store(0);
  prism::parallel_for(64, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      prism::parallel_for(50, 1, [&](int64_t b2, int64_t e2) {
        for (int64_t k = b2; k < e2; ++k) nested[i * 50 + k].fetch_add(1);
      });
  });
  bool once = true;
  for (auto& h : nested) once &= h.load() == 1;
  EXPECT(once, "nested parallel_for covers every (outer, inner) index once");

  // Concurrent callers from several threads: one gets the pool, the others
  // run inline; none may lose or repeat work.
  std::atomic<int> concurrent_failures{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      for (int rep = 0; rep < 30; ++rep) {
        const int64_t n = 500 + 37 * t + rep;
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        for (auto& h : hits) h.store(0);
        prism::parallel_for(n, 3, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (auto& h : hits)
          if (h.load() != 1) concurrent_failures.fetch_add(1);
      }
    });
  for (auto& th : callers) th.join();
  EXPECT(concurrent_failures.load() == 0, "concurrent parallel_for calls cover every index once");

  // Back-to-back calls, each with its own function and output: a worker that
  // wakes late must not run a chunk of an earlier (finished) call, or of a
  // later one with the earlier call's function (ASan/TSan see either).
  int back_to_back_failures = 0;
  for (int rep = 0; rep < 2000; ++rep) {
    const int64_t n = 2 + rep % 9;
    std::vector<int> hits(static_cast<size_t>(n), 0);
    prism::parallel_for(n, 1, [&hits](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) ++hits[i];
    });
    for (int h : hits) back_to_back_failures += h != 1;
  }
  EXPECT(back_to_back_failures == 0, "2000 back-to-back parallel_for calls cover every index once");

  // The caller does not wait for a worker that never took a chunk: a slow
  // chunk held by the caller still lets every index be covered once.
  {
    std::vector<std::atomic<int>> hits(64);
    for (auto& h : hits) h.store(0);
    prism::parallel_for(64, 1, [&](int64_t b, int64_t e) {
      if (b == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    bool once = true;
    for (auto& h : hits) once &= h.load() == 1;
    EXPECT(once, "a slow chunk: every index covered once");
  }

  // An exception in a task reaches the caller, from the pool and inline.
  for (int64_t grain : {1, 100000}) {
    const std::string what = "exception propagation (grain " + std::to_string(grain) + ")";
    bool caught = false;
    try {
      prism::parallel_for(10000, grain, [](int64_t b, int64_t e) {
        if (b <= 517 && 517 < e) throw std::runtime_error("boom at 517");
      });
    } catch (const std::runtime_error& err) {
      caught = std::string(err.what()) == "boom at 517";
    } catch (...) {
    }
    EXPECT(caught, what + ": the task's exception is rethrown on the caller");
    check_cover(10000, 1, what + ": the pool still works afterwards");
  }
  prism::set_num_threads(saved);
  EXPECT(prism::num_threads() == saved, "restore the thread count");
}

// ---------------------------------------------------------------- argument validation

// fn must throw std::invalid_argument whose message starts with `prefix`.
void expect_invalid(const std::function<void()>& fn, const std::string& prefix, const std::string& what) {
  ++g_checks;
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).rfind(prefix, 0) != 0)
      fail(what + ": message '" + e.what() + "' does not start with '" + prefix + "'");
    return;
  } catch (const std::exception& e) {
    fail(what + ": threw a non-invalid_argument exception: " + e.what());
    return;
  }
  fail(what + ": did not throw");
}

void expect_ok(const std::function<void()>& fn, const std::string& what) {
  ++g_checks;
  try {
    fn();
  } catch (const std::exception& e) {
    fail(what + ": the valid baseline threw: " + e.what());
  }
}

void test_bad_args() {
  const Isa best = prism::available_isas().back();
  std::vector<Isa> missing;
  for (Isa isa : {Isa::avx2, Isa::avx512, Isa::neon})
    if (!prism::isa_available(isa)) missing.push_back(isa);
  expect_invalid([] { prism::isa_from_name("sse4"); }, "isa:", "isa_from_name of an unknown name");
  for (Isa isa : missing)
    expect_invalid([isa] { prism::force_isa(isa); }, "isa:", std::string("force_isa(") + prism::isa_name(isa) + ")");

  // segment_means: a valid 2 x 5 x 3 problem, then one bad field at a time.
  std::vector<float> x(30, 1.0f), means(2 * 3 * 3), seg_counts(2 * 3);
  const prism::SegmentMeansProblem seg_ok{x.data(), nullptr, means.data(), seg_counts.data(), 2, 5, 3, 2, 15, 3};
  auto seg_bad = [&](const std::string& prefix, const std::string& what, auto mutate, Isa isa) {
    prism::SegmentMeansProblem p = seg_ok;
    mutate(p);
    expect_invalid([&] { prism::segment_means_f32(p, isa); }, prefix, "segment_means " + what);
  };
  expect_ok([&] { prism::segment_means_f32(seg_ok, best); }, "segment_means");
  seg_bad("seg:", "seg = 0", [](auto& p) { p.seg = 0; }, best);
  seg_bad("seg:", "seg = -3", [](auto& p) { p.seg = -3; }, best);
  seg_bad("x:", "n = 0", [](auto& p) { p.n = 0; }, best);
  seg_bad("x:", "d = 0", [](auto& p) { p.d = 0; }, best);
  seg_bad("x:", "L = -1", [](auto& p) { p.L = -1; }, best);
  for (Isa isa : missing) seg_bad("isa:", std::string("isa ") + prism::isa_name(isa), [](auto&) {}, isa);

  // compressed_attention: B = 2, H = 1, nq = 2, nk = 3, dh = 4.
  std::vector<float> qkv(2 * 3 * 4, 0.5f), out(2 * 2 * 4), counts = {1, 2, 0, 1, 1, 1};
  std::vector<int32_t> q_pos = {0, 1, 0, 1}, k_pos = {0, 0, 1, 0, 0, 1};
  prism::AttentionProblem att_ok{};
  att_ok.q = att_ok.k = att_ok.v = qkv.data();
  att_ok.out = out.data();
  att_ok.counts = counts.data();
  att_ok.q_pos = q_pos.data();
  att_ok.k_pos = k_pos.data();
  att_ok.B = 2, att_ok.H = 1, att_ok.nq = 2, att_ok.nk = 3, att_ok.dh = 4;
  att_ok.counts_batches = att_ok.pos_batches = 2;
  const int64_t kv_st[3] = {12, 12, 4}, q_st[3] = {8, 8, 4};
  std::copy(q_st, q_st + 3, att_ok.q_strides);
  std::copy(q_st, q_st + 3, att_ok.out_strides);
  std::copy(kv_st, kv_st + 3, att_ok.k_strides);
  std::copy(kv_st, kv_st + 3, att_ok.v_strides);
  att_ok.scale = 0.5f;
  auto att_bad = [&](const std::string& prefix, const std::string& what, auto mutate, Isa isa) {
    prism::AttentionProblem p = att_ok;
    mutate(p);
    expect_invalid([&] { prism::compressed_attention_f32(p, isa); }, prefix, "compressed_attention " + what);
  };
  expect_ok([&] { prism::compressed_attention_f32(att_ok, best); }, "compressed_attention");
  att_bad("q:", "nq = 0", [](auto& p) { p.nq = 0; }, best);
  att_bad("q:", "nk = 0", [](auto& p) { p.nk = 0; }, best);
  att_bad("q:", "dh = 0", [](auto& p) { p.dh = 0; }, best);
  att_bad("counts:", "counts_batches = 3", [](auto& p) { p.counts_batches = 3; }, best);
  att_bad("q_pos:", "pos_batches = 3", [](auto& p) { p.pos_batches = 3; }, best);
  att_bad("q_pos:", "q_pos without k_pos", [](auto& p) { p.k_pos = nullptr; }, best);
  att_bad("q_pos:", "k_pos without q_pos", [](auto& p) { p.q_pos = nullptr; }, best);
  for (float badc : {-1.0f, kNaN, kInf}) {
    std::vector<float> bad_counts = counts;
    bad_counts[4] = badc;
    att_bad("counts:", "count " + std::to_string(badc), [&](auto& p) { p.counts = bad_counts.data(); }, best);
  }
  for (Isa isa : missing) att_bad("isa:", std::string("isa ") + prism::isa_name(isa), [](auto&) {}, isa);

  // masked_softmax: scores [2, 2, 3] (lead = (2,), nq = 2, nk = 3).
  std::vector<float> scores(12, 0.25f), sm_out(12);
  prism::SoftmaxProblem sm_ok{};
  sm_ok.scores = scores.data();
  sm_ok.out = sm_out.data();
  sm_ok.counts = counts.data();
  sm_ok.q_pos = q_pos.data();
  sm_ok.k_pos = k_pos.data();
  sm_ok.lead_ndim = 1;
  sm_ok.lead[0] = 2;
  sm_ok.nq = 2;
  sm_ok.nk = 3;
  sm_ok.counts_batches = sm_ok.pos_batches = 2;
  auto sm_bad = [&](const std::string& prefix, const std::string& what, auto mutate, Isa isa) {
    prism::SoftmaxProblem p = sm_ok;
    mutate(p);
    expect_invalid([&] { prism::masked_softmax_f32(p, isa); }, prefix, "masked_softmax " + what);
  };
  expect_ok([&] { prism::masked_softmax_f32(sm_ok, best); }, "masked_softmax");
  sm_bad("scores:", "lead_ndim = 9", [](auto& p) { p.lead_ndim = 9; }, best);
  sm_bad("scores:", "lead_ndim = -1", [](auto& p) { p.lead_ndim = -1; }, best);
  sm_bad("scores:", "nq = 0", [](auto& p) { p.nq = 0; }, best);
  sm_bad("scores:", "nk = 0", [](auto& p) { p.nk = 0; }, best);
  sm_bad("counts:", "counts_batches = 3", [](auto& p) { p.counts_batches = 3; }, best);
  sm_bad("q_pos:", "pos_batches = 3", [](auto& p) { p.pos_batches = 3; }, best);
  sm_bad("q_pos:", "q_pos without k_pos", [](auto& p) { p.k_pos = nullptr; }, best);
  for (float badc : {-1.0f, kNaN, -kInf}) {
    std::vector<float> bad_counts = counts;
    bad_counts[1] = badc;
    sm_bad("counts:", "count " + std::to_string(badc), [&](auto& p) { p.counts = bad_counts.data(); }, best);
  }
  for (Isa isa : missing) sm_bad("isa:", std::string("isa ") + prism::isa_name(isa), [](auto&) {}, isa);
}

// ---------------------------------------------------------------- quantized linear

// Weight-only int8 / int4 linear layers and their dequantization (ops.h
// QuantProblem) on every ISA: against a float64 reference of the dequantized
// weights within (K + 4) u (sum_k |x_k w_k| + |bias|) per output
// (quantized_linear.h), the dequantized weights exact (the float32 rounding
// of the exact value), x padding columns NaN (never read), guard elements
// after each output, and 1 vs 3 threads bit for bit.
struct QuantCase {
  int64_t M, N, K, group;  // group 0: int8
  bool bias;
};

void run_quant_case(const QuantCase& c, uint64_t seed) {
  Rng rng(seed);
  const bool int4 = c.group > 0;
  const int64_t pad = 3, x_stride = c.K + pad, G = int4 ? c.K / c.group : 1;
  std::vector<float> x(c.M * x_stride + 1, kNaN);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t k = 0; k < c.K; ++k) x[m * x_stride + k] = rng.uniform(-2.0f, 2.0f);
  std::vector<int8_t> q8(c.N * c.K);
  std::vector<uint8_t> q4(c.N * c.K / 2 + 1);
  std::vector<float> scale(c.N * G), offset(c.N * G), bias(c.N);
  for (auto& v : q8) v = static_cast<int8_t>(rng.randint(-127, 127));
  for (auto& v : q4) v = static_cast<uint8_t>(rng.randint(0, 255));
  for (auto& v : scale) v = rng.uniform(0.001f, 0.1f);
  for (auto& v : offset) v = rng.uniform(-0.8f, 0.0f);
  for (auto& v : bias) v = rng.uniform(-1.0f, 1.0f);
  // float64 dequantized weights, as the kernels define them.
  std::vector<double> w(c.N * c.K);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k) {
      if (int4) {
        const uint8_t b = q4[n * (c.K / 2) + k / 2];
        const int nib = (k & 1) ? b >> 4 : b & 0x0F;
        const int64_t g = n * G + k / c.group;
        w[n * c.K + k] = nib * static_cast<double>(scale[g]) + offset[g];
      } else {
        w[n * c.K + k] = q8[n * c.K + k] * static_cast<double>(scale[n]);
      }
    }
  std::vector<double> ref(c.M * c.N), bound(c.M * c.N);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double y = 0.0, mag = 0.0;
      for (int64_t k = 0; k < c.K; ++k) {
        y += static_cast<double>(x[m * x_stride + k]) * w[n * c.K + k];
        mag += std::fabs(static_cast<double>(x[m * x_stride + k]) * w[n * c.K + k]);
      }
      if (c.bias) y += bias[n], mag += std::fabs(bias[n]);
      ref[m * c.N + n] = y;
      bound[m * c.N + n] = (c.K + 4) * kU * mag;
    }
  const std::string shape = "M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) +
                            (int4 ? " group=" + std::to_string(c.group) : std::string(" int8")) +
                            (c.bias ? " bias" : "");
  auto problem = [&](float* out) {
    prism::QuantProblem p{};
    p.x = x.data();
    p.x_stride = x_stride;
    p.q = int4 ? static_cast<const void*>(q4.data()) : static_cast<const void*>(q8.data());
    p.scale = scale.data();
    p.offset = int4 ? offset.data() : nullptr;
    p.bias = c.bias ? bias.data() : nullptr;
    p.out = out;
    p.M = c.M, p.N = c.N, p.K = c.K, p.group = c.group;
    return p;
  };
  std::vector<float> serial_out;
  for (Isa isa : prism::available_isas()) {
    const std::string what = tag(int4 ? "int4_linear" : "int8_linear", isa, shape);
    Guarded out(c.M * c.N);
    const prism::QuantProblem p = problem(out.data());
    if (int4)
      prism::int4_linear_f32(p, isa);
    else
      prism::int8_linear_f32(p, isa);
    EXPECT(prism::last_dispatched_isa(int4 ? prism::Kernel::int4_linear : prism::Kernel::int8_linear) ==
               static_cast<int>(isa), what + ": dispatch recorded");
    EXPECT(out.guard_intact(), what + ": guard elements untouched");
    ++g_checks;
    for (int64_t i = 0; i < c.M * c.N; ++i)
      if (!(std::fabs(out.buf[i] - ref[i]) <= bound[i])) {
        char buf[200];
        std::snprintf(buf, sizeof buf, ": output %lld is %.9g, expected %.9g within %.3g", static_cast<long long>(i),
                      out.buf[i], ref[i], bound[i]);
        fail(what + buf);
        break;
      }
    // Against serial: both within the bound of the exact value.
    if (isa == Isa::serial) serial_out.assign(out.buf.begin(), out.buf.begin() + c.M * c.N);
    ++g_checks;
    for (int64_t i = 0; i < c.M * c.N; ++i)
      if (!(std::fabs(out.buf[i] - serial_out[i]) <= 2.0 * bound[i])) {
        fail(what + ": output " + std::to_string(i) + " differs from serial's by more than twice the bound");
        break;
      }
    // Dequantization: each weight the float32 rounding of the exact value.
    Guarded deq(c.N * c.K);
    prism::QuantProblem d = problem(deq.data());
    d.x = nullptr, d.M = 0;
    if (int4)
      prism::int4_dequantize_f32(d, isa);
    else
      prism::int8_dequantize_f32(d, isa);
    EXPECT(deq.guard_intact(), what + ": dequantize guard untouched");
    ++g_checks;
    for (int64_t i = 0; i < c.N * c.K; ++i)
      if (deq.buf[i] != static_cast<float>(w[i])) {
        fail(what + ": dequantized weight " + std::to_string(i) + " is " + std::to_string(deq.buf[i]) + ", expected " +
             std::to_string(w[i]));
        break;
      }
  }
}

void test_quantized_linear() {
  const int64_t i8_ks[] = {1, 15, 16, 17, 33, 100, 896};
  const int64_t ms[] = {1, 2, 3, 4, 5, 9, 17};
  const int64_t ns[] = {1, 3, 4, 5, 13};
  uint64_t seed = 500;
  for (int64_t K : i8_ks)
    for (int64_t M : ms)
      for (int64_t N : ns) run_quant_case({M, N, K, 0, (M + N) % 2 == 0}, ++seed);
  const int64_t i4[][2] = {{2, 2}, {30, 30}, {60, 10}, {64, 32}, {64, 64}, {96, 32}, {102, 34}, {256, 128}, {896, 32}};
  for (const auto& kg : i4)
    for (int64_t M : ms)
      for (int64_t N : ns) run_quant_case({M, N, kg[0], kg[1], (M + N) % 2 == 1}, ++seed);
  // Threads: a split over N never changes an output's bits.
  const int saved = prism::num_threads();
  Rng rng(91);
  const int64_t M = 3, N = 2000, K = 512;
  std::vector<float> x(M * K), scale(N * (K / 64)), offset(N * (K / 64));
  std::vector<uint8_t> q(N * K);
  for (auto& v : x) v = rng.uniform(-1.0f, 1.0f);
  for (auto& v : q) v = static_cast<uint8_t>(rng.randint(0, 255));
  for (auto& v : scale) v = rng.uniform(0.01f, 0.1f);
  for (auto& v : offset) v = rng.uniform(-1.0f, 0.0f);
  for (Isa isa : prism::available_isas()) {
    std::vector<float> outs[2][2];
    for (int t = 0; t < 2; ++t) {
      prism::set_num_threads(t == 0 ? 1 : 3);
      for (int int4 = 0; int4 < 2; ++int4) {
        outs[t][int4].assign(M * N, 0.0f);
        // int8 reads q as N x K int8, int4 as N x K / 2 packed bytes: the same buffer serves both.
        const prism::QuantProblem p{x.data(), q.data(), scale.data(), int4 ? offset.data() : nullptr, nullptr,
                                    outs[t][int4].data(), M, N, K, int4 ? 64 : 0, K};
        if (int4)
          prism::int4_linear_f32(p, isa);
        else
          prism::int8_linear_f32(p, isa);
      }
    }
    for (int int4 = 0; int4 < 2; ++int4)
      EXPECT(std::memcmp(outs[0][int4].data(), outs[1][int4].data(), sizeof(float) * M * N) == 0,
             tag(int4 ? "int4_linear" : "int8_linear", isa, "N=2000: 3 threads give the 1-thread result bit for bit"));
  }
  prism::set_num_threads(saved);
  // Bad arguments: std::invalid_argument naming the argument.
  std::vector<float> xs(64, 1.0f), s(4, 1.0f), out(128);  // s: N x K / group scales (and offsets)
  std::vector<uint8_t> qb(64, 0);
  auto base = [&] {
    return prism::QuantProblem{xs.data(), qb.data(), s.data(), s.data(), nullptr, out.data(), 1, 2, 32, 16, 32};
  };
  const Isa best = prism::available_isas().back();
  expect_ok([&] { prism::int4_linear_f32(base(), best); }, "int4_linear baseline");
  for (int64_t g : {0, 3, 12, -2}) {
    expect_invalid([&] { auto p = base(); p.group = g; prism::int4_linear_f32(p, best); }, "group:",
                   "int4_linear group " + std::to_string(g));
    expect_invalid([&] { auto p = base(); p.group = g; prism::int4_dequantize_f32(p, best); }, "group:",
                   "int4_dequantize group " + std::to_string(g));
  }
  expect_invalid([&] { auto p = base(); p.offset = nullptr; prism::int4_linear_f32(p, best); }, "offset:",
                 "int4_linear without offsets");
  expect_invalid([&] { auto p = base(); p.N = 0; prism::int8_linear_f32(p, best); }, "q:", "int8_linear N = 0");
  expect_invalid([&] { auto p = base(); p.K = 0; prism::int8_dequantize_f32(p, best); }, "q:", "int8_dequantize K = 0");
  expect_invalid([&] { auto p = base(); p.M = -1; prism::int8_linear_f32(p, best); }, "x:", "int8_linear M < 0");
}

struct Group {
  const char* name;
  void (*run)();
};

// ---------------------------------------------------------------- thread split

// Every kernel gives bit-identical results on 1, 2 and 3 threads (the split
// never changes what one task computes), for problems below the work
// threshold (run on the caller), just above it and far above it.
void test_thread_split() {
  const int saved = prism::num_threads();
  Rng rng(77);
  auto fill = [&](std::vector<float>& v) {
    for (float& x : v) x = rng.uniform(-2.0f, 2.0f);
  };
  auto run_all = [&](const std::function<void(std::vector<float>&)>& run, const std::string& what) {
    std::vector<float> one, many;
    prism::set_num_threads(1);
    run(one);
    for (int threads : {2, 3}) {
      prism::set_num_threads(threads);
      run(many);
      EXPECT(one.size() == many.size() && std::memcmp(one.data(), many.data(), sizeof(float) * one.size()) == 0,
             what + ": " + std::to_string(threads) + " threads give the 1-thread result bit for bit");
    }
  };
  const Isa best = prism::available_isas().back();
  for (int64_t L : {1, 3, 64}) {  // ~0.1 MB, ~0.3 MB, ~6.5 MB of x
    const int64_t n = 33, d = 770, seg = 4, m = (n + seg - 1) / seg;
    std::vector<float> x(L * n * d);
    fill(x);
    run_all([&](std::vector<float>& out) {
      out.assign(L * m * (d + 1), 0.0f);
      prism::SegmentMeansProblem p{x.data(), nullptr, out.data(), out.data() + L * m * d, L, n, d, seg, n * d, d};
      prism::segment_means_f32(p, best);
    }, "segment_means L=" + std::to_string(L));
  }
  for (int64_t H : {1, 4, 12}) {
    const int64_t nq = 70, nk = 90, dh = 64;
    std::vector<float> q(H * nq * dh), k(H * nk * dh), v(H * nk * dh), counts(nk, 2.0f);
    fill(q), fill(k), fill(v);
    run_all([&](std::vector<float>& out) {
      out.assign(H * nq * dh, 0.0f);
      prism::AttentionProblem p{};
      p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.counts = counts.data();
      p.B = 1, p.H = H, p.nq = nq, p.nk = nk, p.dh = dh, p.counts_batches = 1, p.pos_batches = 1;
      const int64_t qs[3] = {H * nq * dh, nq * dh, dh}, ks[3] = {H * nk * dh, nk * dh, dh};
      std::copy(qs, qs + 3, p.q_strides), std::copy(qs, qs + 3, p.out_strides);
      std::copy(ks, ks + 3, p.k_strides), std::copy(ks, ks + 3, p.v_strides);
      p.scale = 0.125f;
      prism::compressed_attention_f32(p, best);
    }, "compressed_attention H=" + std::to_string(H));
  }
  for (int64_t rows : {5, 200, 3000}) {
    const int64_t nk = 176;
    std::vector<float> scores(rows * nk);
    fill(scores);
    run_all([&](std::vector<float>& out) {
      out.assign(rows * nk, 0.0f);
      prism::SoftmaxProblem p{};
      p.scores = scores.data(), p.out = out.data(), p.lead_ndim = 1, p.lead[0] = rows;
      p.nq = 1, p.nk = nk, p.counts_batches = 1, p.pos_batches = 1;
      prism::masked_softmax_f32(p, best);
    }, "masked_softmax rows=" + std::to_string(rows));
  }
  prism::set_num_threads(saved);
}

const Group kGroups[] = {{"isa", test_isa},
                         {"segment_means", test_segment_means},
                         {"segment_means_long", test_segment_means_long},
                         {"compressed_attention", test_compressed_attention},
                         {"masked_softmax", test_masked_softmax},
                         {"threadpool", test_threadpool},
                         {"thread_split", test_thread_split},
                         {"quantized_linear", test_quantized_linear},
                         {"bad_args", test_bad_args}};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> selected(argv + 1, argv + argc);
  for (const std::string& s : selected) {
    bool known = false;
    for (const Group& g : kGroups) known |= s == g.name;
    if (!known) {
      std::fprintf(stderr, "unknown test group '%s'\n", s.c_str());
      return 2;
    }
  }
  std::printf("ISAs tested against serial:");
  for (Isa isa : prism::available_isas()) std::printf(" %s", prism::isa_name(isa));
  std::printf("\n");
  for (Isa isa : {Isa::avx2, Isa::avx512, Isa::neon})
    if (!prism::isa_available(isa))
      std::printf("not tested: %s: %s\n", prism::isa_name(isa), unavailable_reason(isa).c_str());
  for (const Group& g : kGroups) {
    if (!selected.empty() && std::find(selected.begin(), selected.end(), g.name) == selected.end()) continue;
    const int before = g_failures;
    g.run();
    std::printf("%-22s %s\n", g.name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%ld checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
