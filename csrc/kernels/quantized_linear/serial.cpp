// Serial quantized linear kernels: the plain loops, one float32 sum per
// output in k order (quantized_linear.h).
#include <cmath>

#include "quantized_linear.h"

namespace prism {

namespace {

inline float nibble(const uint8_t* row, int64_t k) {
  const uint8_t b = row[k >> 1];
  return static_cast<float>((k & 1) ? (b >> 4) : (b & 0x0F));
}

}  // namespace

void int8_linear_f32_serial(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  const int8_t* q = static_cast<const int8_t*>(p.q);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = q + n * p.K;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.x_stride;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += x[k] * static_cast<float>(row[k]);
      float y = acc * p.scale[n];
      if (p.bias) y += p.bias[n];
      p.out[m * p.N + n] = y;
    }
  }
}

void int4_linear_f32_serial(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  const uint8_t* q = static_cast<const uint8_t*>(p.q);
  const int64_t groups = p.K / p.group;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = q + n * (p.K / 2);
    const float *s = p.scale + n * groups, *o = p.offset + n * groups;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.x_stride;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t g = k / p.group;
        acc += x[k] * std::fma(nibble(row, k), s[g], o[g]);
      }
      p.out[m * p.N + n] = p.bias ? acc + p.bias[n] : acc;
    }
  }
}

void int8_dequantize_f32_serial(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  const int8_t* q = static_cast<const int8_t*>(p.q);
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t k = 0; k < p.K; ++k) p.out[n * p.K + k] = static_cast<float>(q[n * p.K + k]) * p.scale[n];
}

void int4_dequantize_f32_serial(const QuantProblem& p, int64_t n_begin, int64_t n_end) {
  const uint8_t* q = static_cast<const uint8_t*>(p.q);
  const int64_t groups = p.K / p.group;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = q + n * (p.K / 2);
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t g = n * groups + k / p.group;
      p.out[n * p.K + k] = std::fma(nibble(row, k), p.scale[g], p.offset[g]);
    }
  }
}

}  // namespace prism
