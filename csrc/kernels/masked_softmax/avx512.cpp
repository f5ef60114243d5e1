// AVX-512F masked softmax of one row, three passes over out (which stays in L1
// for the usual row lengths): logits + running max, exp + sum, scale. The
// logits are summed in the serial kernel's order; only exp_ps (~2 ulp) and the
// order of the final sum differ from it.
#include <cstdint>

#include "masked_softmax.h"
#include "simd/avx512.h"

namespace prism {
namespace {

using namespace simd_avx512;

// z for the keys j + lane, lane set in `lanes` (all 16, or the row tail):
// score + key bias + mask, -inf where the key is hidden and in unset lanes.
// Masked loads never touch memory past the row.
static inline __m512 logits(const SoftmaxRow& r, int64_t j, __mmask16 lanes) {
  __m512 z = _mm512_maskz_loadu_ps(lanes, r.scores + j);
  if (r.key_bias) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(lanes, r.key_bias + j));
  if (r.add_mask) {
    __m512 m;
    if (r.add_mask_stride == 1) {
      m = _mm512_maskz_loadu_ps(lanes, r.add_mask + j);
    } else if (r.add_mask_stride == 0) {
      m = _mm512_set1_ps(r.add_mask[0]);
    } else {  // any other stride: gather the lanes one by one
      float g[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < 16; ++i)
        if ((lanes >> i) & 1) g[i] = r.add_mask[(j + i) * r.add_mask_stride];
      m = _mm512_loadu_ps(g);
    }
    z = _mm512_add_ps(z, m);
  }
  __mmask16 visible = lanes;
  // A count-0 key is hidden whatever its score (NaN + -inf would be NaN).
  if (r.key_bias)
    visible &= static_cast<__mmask16>(
        ~_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(lanes, r.key_bias + j), _mm512_set1_ps(-__builtin_huge_valf()),
                            _CMP_EQ_OQ));
  if (r.k_pos) {
    const __m512i kp = _mm512_maskz_loadu_epi32(lanes, r.k_pos + j);
    visible &= static_cast<__mmask16>(~_mm512_cmpgt_epi32_mask(kp, _mm512_set1_epi32(r.q_pos)));
  }
  return _mm512_mask_blend_ps(visible, _mm512_set1_ps(-__builtin_huge_valf()), z);
}

}  // namespace

void masked_softmax_row_f32_avx512(const SoftmaxRow& r) {
  const int64_t n = r.nk, n16 = n - n % 16;
  const __mmask16 all = tail_mask(16), tail = tail_mask(n % 16);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_huge_valf());

  // Pass 1: z into out, running max. max_ps(z, m) returns m when z is NaN, so
  // NaN logits are ignored like std::fmax does in the serial kernel.
  // Lanes where z is not < +inf (NaN or +inf) make the row NaN.
  __m512 vmax = neg_inf;
  const __m512 pos_inf = _mm512_set1_ps(__builtin_huge_valf());
  __mmask16 bad = 0;
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 z = logits(r, j, all);
    _mm512_storeu_ps(r.out + j, z);
    vmax = _mm512_max_ps(z, vmax);
    bad |= _mm512_cmp_ps_mask(z, pos_inf, _CMP_NLT_UQ);
  }
  if (tail) {
    const __m512 z = logits(r, n16, tail);
    _mm512_mask_storeu_ps(r.out + n16, tail, z);
    vmax = _mm512_max_ps(z, vmax);
    bad |= _mm512_cmp_ps_mask(z, pos_inf, _CMP_NLT_UQ);
  }
  const float max_z = hmax(vmax);
  if (bad || max_z == -__builtin_huge_valf()) {  // NaN row, or nothing visible
    const __m512 fill = bad ? _mm512_set1_ps(__builtin_nanf("")) : _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += 16) _mm512_storeu_ps(r.out + j, fill);
    _mm512_mask_storeu_ps(r.out + n16, tail, fill);
    return;
  }

  // Pass 2: e = exp(z - max), summed in two accumulators. Tail lanes past the
  // row load as -inf, so they add exp(-inf) = 0.
  const __m512 m = _mm512_set1_ps(max_z);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(r.out + j), m));
    const __m512 e1 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(r.out + j + 16), m));
    _mm512_storeu_ps(r.out + j, e0);
    _mm512_storeu_ps(r.out + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  if (j < n16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(r.out + j), m));
    _mm512_storeu_ps(r.out + j, e);
    sum0 = _mm512_add_ps(sum0, e);
  }
  if (tail) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, tail, r.out + n16), m));
    _mm512_mask_storeu_ps(r.out + n16, tail, e);
    sum1 = _mm512_add_ps(sum1, e);
  }

  // Pass 3: scale.
  const __m512 inv = _mm512_set1_ps(1.0f / hsum(_mm512_add_ps(sum0, sum1)));
  for (j = 0; j < n16; j += 16) _mm512_storeu_ps(r.out + j, _mm512_mul_ps(_mm512_loadu_ps(r.out + j), inv));
  _mm512_mask_storeu_ps(r.out + n16, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, r.out + n16), inv));
}

}  // namespace prism
