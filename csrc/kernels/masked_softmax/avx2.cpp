// AVX2 masked softmax of one row, three passes over out (which stays in L1 for
// the usual row lengths): logits + running max, exp + sum, scale. The logits
// are summed in the serial kernel's order; only exp_ps (~2 ulp) and the order
// of the final sum differ from it.
#include <cstdint>

#include "masked_softmax.h"
#include "simd/avx2.h"

namespace prism {
namespace {

using namespace simd_avx2;

// Full vectors use plain loads; the row tail (kTail) masked ones, which never
// touch memory past the row.
template <bool kTail>
static inline __m256 load(const float* p, __m256i tail) {
  return kTail ? _mm256_maskload_ps(p, tail) : _mm256_loadu_ps(p);
}

template <bool kTail>
static inline void store(float* p, __m256 v, __m256i tail) {
  if (kTail)
    _mm256_maskstore_ps(p, tail, v);
  else
    _mm256_storeu_ps(p, v);
}

// z for keys [j, j + 8) (or the `lanes` of the tail): score + key bias + mask,
// -inf where the key is hidden and in lanes past the row.
template <bool kTail>
static inline __m256 logits(const SoftmaxRow& r, int64_t j, __m256i tail, int64_t lanes) {
  __m256 z = load<kTail>(r.scores + j, tail);
  if (r.key_bias) z = _mm256_add_ps(z, load<kTail>(r.key_bias + j, tail));
  if (r.add_mask) {
    __m256 m;
    if (r.add_mask_stride == 1) {
      m = load<kTail>(r.add_mask + j, tail);
    } else if (r.add_mask_stride == 0) {
      m = _mm256_set1_ps(r.add_mask[0]);
    } else {  // any other stride: gather the lanes one by one
      float g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < lanes; ++i) g[i] = r.add_mask[(j + i) * r.add_mask_stride];
      m = _mm256_loadu_ps(g);
    }
    z = _mm256_add_ps(z, m);
  }
  __m256 hidden = kTail ? _mm256_castsi256_ps(_mm256_xor_si256(tail, _mm256_set1_epi32(-1))) : _mm256_setzero_ps();
  // A count-0 key is hidden whatever its score (NaN + -inf would be NaN).
  if (r.key_bias)
    hidden = _mm256_or_ps(hidden, _mm256_cmp_ps(load<kTail>(r.key_bias + j, tail),
                                                 _mm256_set1_ps(-__builtin_huge_valf()), _CMP_EQ_OQ));
  if (r.k_pos) {
    const __m256i kp = kTail ? _mm256_maskload_epi32(r.k_pos + j, tail)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.k_pos + j));
    hidden = _mm256_or_ps(hidden, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kp, _mm256_set1_epi32(r.q_pos))));
  }
  return _mm256_blendv_ps(z, _mm256_set1_ps(-__builtin_huge_valf()), hidden);
}

}  // namespace

void masked_softmax_row_f32_avx2(const SoftmaxRow& r) {
  const int64_t n = r.nk, n8 = n - n % 8;
  const __m256i tail = tail_mask(n % 8);
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_huge_valf());

  // Pass 1: z into out, running max. max_ps(z, m) returns m when z is NaN, so
  // NaN logits are ignored like std::fmax does in the serial kernel.
  // Lanes where z is not < +inf (NaN or +inf) make the row NaN.
  __m256 vmax = neg_inf;
  const __m256 pos_inf = _mm256_set1_ps(__builtin_huge_valf());
  __m256 bad = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 z = logits<false>(r, j, tail, 8);
    _mm256_storeu_ps(r.out + j, z);
    vmax = _mm256_max_ps(z, vmax);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, pos_inf, _CMP_NLT_UQ));
  }
  if (n8 < n) {
    const __m256 z = logits<true>(r, n8, tail, n - n8);
    store<true>(r.out + n8, z, tail);
    vmax = _mm256_max_ps(z, vmax);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, pos_inf, _CMP_NLT_UQ));
  }
  const float max_z = hmax(vmax);
  const bool any_bad = _mm256_movemask_ps(bad) != 0;
  if (any_bad || max_z == -__builtin_huge_valf()) {  // NaN row, or nothing visible
    const __m256 fill = any_bad ? _mm256_set1_ps(__builtin_nanf("")) : _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(r.out + j, fill);
    if (n8 < n) store<true>(r.out + n8, fill, tail);
    return;
  }

  // Pass 2: e = exp(z - max), summed in two accumulators. Tail lanes past the
  // row are exp(-inf) = 0.
  const __m256 m = _mm256_set1_ps(max_z);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(r.out + j), m));
    const __m256 e1 = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(r.out + j + 8), m));
    _mm256_storeu_ps(r.out + j, e0);
    _mm256_storeu_ps(r.out + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  if (j < n8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(r.out + j), m));
    _mm256_storeu_ps(r.out + j, e);
    sum0 = _mm256_add_ps(sum0, e);
  }
  if (n8 < n) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_blendv_ps(neg_inf, load<true>(r.out + n8, tail),
                                                           _mm256_castsi256_ps(tail)),
                                          m));
    store<true>(r.out + n8, e, tail);
    sum1 = _mm256_add_ps(sum1, e);
  }

  // Pass 3: scale.
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(_mm256_add_ps(sum0, sum1)));
  for (j = 0; j < n8; j += 8) _mm256_storeu_ps(r.out + j, _mm256_mul_ps(_mm256_loadu_ps(r.out + j), inv));
  if (n8 < n) store<true>(r.out + n8, _mm256_mul_ps(load<true>(r.out + n8, tail), inv), tail);
}

}  // namespace prism
