// google-benchmark binary: every kernel x every ISA x thread count (1, 2) on
// the shapes of issue 2 (the quantized linear layers on those of issue 22), through the drivers of ops.h with an explicit Isa.
// ISAs this build or CPU cannot run are skipped with the reason. The
// pool size is the /pool:N part of each name. Counters:
// bytes/s (minimal traffic: inputs read + outputs written once) and FLOP/s.
// The shapes mirror prism_ext/bench.py, which times the same kernels against
// torch; this binary has no peer and reports absolute rates only.
//
//   prism_kernels_bench [--benchmark_filter=attention/avx2] [google-benchmark flags]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "isa.h"
#include "ops.h"
#include "threadpool.h"

namespace {

using prism::Isa;

constexpr int64_t kSeqLen = 512;
constexpr int64_t kQueryLens[] = {64, 128, 256, 512};
constexpr int64_t kRates[] = {4, 16, 128};
constexpr int64_t kWidths[] = {768, 384};
constexpr int kThreads[] = {1, 2};
constexpr Isa kIsas[] = {Isa::serial, Isa::avx2, Isa::avx512, Isa::neon};

struct Model {
  const char* name;
  int64_t heads, dh;
  bool causal;
};
// BERT-base and GPT-2-small share the head shape (GPT-2 is the causal one);
// MiniLM is all-MiniLM-L6-v2.
constexpr Model kModels[] = {{"bert-base", 12, 64, false}, {"gpt2-small", 12, 64, true}, {"minilm", 12, 32, false}};

// Empty if `isa` can run here, else why not.
std::string unavailable_reason(Isa isa) {
  if (prism::isa_available(isa)) return "";
  const auto& f = prism::cpu_features();
  bool cpu_has = false;
  std::string missing;
  switch (isa) {
    case Isa::avx2:
      cpu_has = f.avx2 && f.fma && f.os_avx;
      missing = "AVX2+FMA (or the OS does not save YMM state)";
      break;
    case Isa::avx512:
      cpu_has = f.avx512f && f.os_avx512;
      missing = "AVX-512F (or the OS does not save ZMM state)";
      break;
    case Isa::neon:
      cpu_has = f.neon;
      missing = "NEON";
      break;
    case Isa::serial:
      break;
  }
  if (cpu_has) return std::string(prism::isa_name(isa)) + ": not compiled into this build";
  return std::string(prism::isa_name(isa)) + ": this CPU lacks " + missing;
}

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Keys of one device (see prism_ext.bench.Layout): own nq positions, then one
// mean per CR positions of the other partitions, the own block starting at a
// multiple of CR in the middle so that causal queries see earlier means and
// not later ones. nk = nq + ceil((N - nq) / CR).
struct Layout {
  std::vector<float> counts;
  std::vector<int32_t> q_pos, k_pos;
};

Layout make_layout(int64_t nq, int64_t cr) {
  Layout l;
  const int64_t start = cr * (((kSeqLen - nq) / 2) / cr);
  for (int64_t i = 0; i < nq; ++i) {
    l.counts.push_back(1.0f);
    l.q_pos.push_back(static_cast<int32_t>(start + i));
    l.k_pos.push_back(static_cast<int32_t>(start + i));
  }
  const int64_t ranges[2][2] = {{0, start}, {start + nq, kSeqLen}};
  for (const auto& r : ranges)
    for (int64_t s = r[0]; s < r[1]; s += cr) {
      const int64_t e = std::min(r[1], s + cr);
      l.counts.push_back(static_cast<float>(e - s));
      l.k_pos.push_back(static_cast<int32_t>(e - 1));
    }
  return l;
}

void set_rates(benchmark::State& state, double bytes, double flops) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["bytes/s"] = benchmark::Counter(bytes * iters, benchmark::Counter::kIsRate);
  state.counters["FLOP/s"] = benchmark::Counter(flops * iters, benchmark::Counter::kIsRate);
}

// Returns false (and marks the run skipped) if the ISA cannot run here.
bool prepare(benchmark::State& state, Isa isa, int threads) {
  const std::string why = unavailable_reason(isa);
  if (!why.empty()) {
    state.SkipWithError(why.c_str());
    return false;
  }
  prism::set_num_threads(threads);
  return true;
}

void bench_segment_means(benchmark::State& state, Isa isa, int threads, int64_t n, int64_t d, int64_t seg) {
  if (!prepare(state, isa, threads)) return;
  const int64_t m = (n + seg - 1) / seg;
  const std::vector<float> x = random_floats(static_cast<size_t>(n * d), 1);
  std::vector<float> means(static_cast<size_t>(m * d)), counts(static_cast<size_t>(m));
  const prism::SegmentMeansProblem p{x.data(), nullptr, means.data(), counts.data(), 1, n, d, seg, n * d, d};
  for (auto _ : state) {
    prism::segment_means_f32(p, isa);
    benchmark::DoNotOptimize(means.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 4.0 * (n * d + m * d + m), static_cast<double>(n * d));
}

void bench_attention(benchmark::State& state, Isa isa, int threads, const Model& model, int64_t nq, int64_t cr) {
  if (!prepare(state, isa, threads)) return;
  const Layout lay = make_layout(nq, cr);
  const int64_t nk = static_cast<int64_t>(lay.counts.size()), H = model.heads, dh = model.dh;
  const std::vector<float> q = random_floats(static_cast<size_t>(H * nq * dh), 2);
  const std::vector<float> k = random_floats(static_cast<size_t>(H * nk * dh), 3);
  const std::vector<float> v = random_floats(static_cast<size_t>(H * nk * dh), 4);
  std::vector<float> out(q.size());
  prism::AttentionProblem p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.counts = lay.counts.data();
  p.q_pos = model.causal ? lay.q_pos.data() : nullptr;
  p.k_pos = model.causal ? lay.k_pos.data() : nullptr;
  p.B = 1;
  p.H = H;
  p.nq = nq;
  p.nk = nk;
  p.dh = dh;
  p.counts_batches = 1;
  p.pos_batches = 1;
  const int64_t qs[3] = {H * nq * dh, nq * dh, dh}, ks[3] = {H * nk * dh, nk * dh, dh};
  std::copy(qs, qs + 3, p.q_strides);
  std::copy(qs, qs + 3, p.out_strides);
  std::copy(ks, ks + 3, p.k_strides);
  std::copy(ks, ks + 3, p.v_strides);
  p.scale = 1.0f / std::sqrt(static_cast<float>(dh));
  for (auto _ : state) {
    prism::compressed_attention_f32(p, isa);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // q.k and p.v as multiply-adds (2 FLOPs each); causal counted dense too.
  set_rates(state, 4.0 * H * dh * (2 * nq + 2 * nk), 4.0 * H * nq * nk * dh);
}

void bench_softmax(benchmark::State& state, Isa isa, int threads, int64_t heads, bool causal, int64_t nq,
                   int64_t cr) {
  if (!prepare(state, isa, threads)) return;
  const Layout lay = make_layout(nq, cr);
  const int64_t nk = static_cast<int64_t>(lay.counts.size());
  const std::vector<float> scores = random_floats(static_cast<size_t>(heads * nq * nk), 5);
  std::vector<float> out(scores.size());
  prism::SoftmaxProblem p{};
  p.scores = scores.data();
  p.out = out.data();
  p.counts = lay.counts.data();
  p.q_pos = causal ? lay.q_pos.data() : nullptr;
  p.k_pos = causal ? lay.k_pos.data() : nullptr;
  p.lead_ndim = 1;
  p.lead[0] = heads;
  p.nq = nq;
  p.nk = nk;
  p.counts_batches = 1;
  p.pos_batches = 1;
  for (auto _ : state) {
    prism::masked_softmax_f32(p, isa);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 8.0 * heads * nq * nk, 4.0 * heads * nq * nk);
}

// Weight-only quantized linear (issue 22): y[M, N] = x[M, K] @ w.T with int8
// (per-row scales) or int4 (group 32) weights; bytes/s counts the weight
// bytes (with scales and offsets) plus x and y, the traffic of one call.
struct LinearShape {
  const char* name;
  int64_t K, N;
};
constexpr LinearShape kLinearShapes[] = {{"qwen0.5b-mlp-up", 896, 4864},
                                         {"qwen0.5b-mlp-down", 4864, 896},
                                         {"qwen0.5b-qkv", 896, 1152},
                                         {"llama3.2-1b-mlp-up", 2048, 8192}};
constexpr int64_t kLinearRows[] = {1, 8};

void bench_quant_linear(benchmark::State& state, Isa isa, int threads, bool int4, LinearShape shape, int64_t M) {
  if (!prepare(state, isa, threads)) return;
  const int64_t K = shape.K, N = shape.N, group = 32, G = int4 ? K / group : 1;
  const std::vector<float> x = random_floats(static_cast<size_t>(M * K), 6);
  std::mt19937 gen(7);
  std::vector<uint8_t> q(static_cast<size_t>(int4 ? N * K / 2 : N * K));
  for (auto& b : q) b = static_cast<uint8_t>(gen() & 0xFF);
  std::vector<float> scale(static_cast<size_t>(N * G), 0.01f), offset(static_cast<size_t>(N * G), -0.1f);
  std::vector<float> out(static_cast<size_t>(M * N));
  const prism::QuantProblem p{x.data(), q.data(), scale.data(), int4 ? offset.data() : nullptr, nullptr, out.data(),
                              M, N, K, int4 ? group : 0, K};
  for (auto _ : state) {
    if (int4)
      prism::int4_linear_f32(p, isa);
    else
      prism::int8_linear_f32(p, isa);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double weight_bytes = static_cast<double>(q.size()) + 4.0 * static_cast<double>(N * G * (int4 ? 2 : 1));
  set_rates(state, weight_bytes + 4.0 * (M * K + M * N), 2.0 * M * N * K);
}

// Layouts with distinct (nq, nk): at nq = N every CR gives nk = N.
std::vector<std::pair<int64_t, int64_t>> query_layouts() {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t nq : kQueryLens)
    for (int64_t cr : kRates) {
      if (nq == kSeqLen && !out.empty() && out.back().first == nq) continue;
      out.emplace_back(nq, cr);
    }
  return out;
}

std::string suffix(int64_t nq, int64_t cr, int threads) {
  return (nq < kSeqLen ? "/cr:" + std::to_string(cr) : std::string()) + "/pool:" + std::to_string(threads);
}

// Wall-clock time: the drivers run on the thread pool, CPU time of the
// calling thread would hide the other workers.
template <typename... Args>
void add(const std::string& name, Args&&... args) {
  benchmark::RegisterBenchmark(name.c_str(), std::forward<Args>(args)...)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

void register_all() {
  for (Isa isa : kIsas) {
    const std::string isa_s = prism::isa_name(isa);
    for (int t : kThreads) {
      for (int64_t d : kWidths)
        for (int64_t nq : kQueryLens)
          for (int64_t cr : kRates)
            for (int64_t n : {nq, nq - 1}) {  // nq itself and a partition one row short
              const std::string name = "segment_means/" + isa_s + "/n:" + std::to_string(n) + "/d:" +
                                       std::to_string(d) + "/seg:" + std::to_string(cr) +
                                       "/pool:" + std::to_string(t);
              add(name, bench_segment_means, isa, t, n, d, cr);
            }
      for (const Model& model : kModels)
        for (auto [nq, cr] : query_layouts()) {
          const std::string name = std::string("attention/") + isa_s + "/" + model.name + "/nq:" +
                                   std::to_string(nq) + suffix(nq, cr, t);
          add(name, bench_attention, isa, t, model, nq, cr);
        }
      for (bool causal : {false, true})
        for (auto [nq, cr] : query_layouts()) {
          const std::string name = "softmax/" + isa_s + (causal ? "/causal" : "/bidirectional") + "/h:12/nq:" +
                                   std::to_string(nq) + suffix(nq, cr, t);
          add(name, bench_softmax, isa, t, int64_t{12}, causal, nq, cr);
        }
      for (bool int4 : {false, true})
        for (const LinearShape& shape : kLinearShapes)
          for (int64_t M : kLinearRows) {
            const std::string name = std::string(int4 ? "int4_linear/" : "int8_linear/") + isa_s + "/" + shape.name +
                                     "/K:" + std::to_string(shape.K) + "/N:" + std::to_string(shape.N) +
                                     "/M:" + std::to_string(M) + "/pool:" + std::to_string(t);
            add(name, bench_quant_linear, isa, t, int4, shape, M);
          }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("prism_isas", [] {
    std::string s;
    for (Isa isa : prism::available_isas()) s += (s.empty() ? "" : ",") + std::string(prism::isa_name(isa));
    return s;
  }());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
