// float32 products of a few rows against a weight [out, in], read row after row: a dot
// product per weight row with AVX-512, the rows split over torch's threads. For one row
// this reads the weight once, in memory order, as MKL's GEMV does, without its per-call
// set-up, and on the same OpenMP team as every other parallel loop of a kernel.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// out[n] = sum_k x[k] * weight[n][k] for the rows n in [begin, end)
__attribute__((target("avx512f"))) void float_dots(float* out, const float* x,
                                                     const float* weight, int64_t in,
                                                     int64_t begin, int64_t end) {
  const int64_t pairs = in / 32 * 32, full = in / 16 * 16;
  const __mmask16 tail = in == full ? 0 : static_cast<__mmask16>((1u << (in - full)) - 1);
  for (int64_t n = begin; n < end; ++n) {
    const float* w = weight + n * in;
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < pairs; k += 32) {
      even = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), even);
      odd = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), odd);
    }
    for (; k < full; k += 16) {
      even = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), even);
    }
    if (tail) {
      odd = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + full),
                            _mm512_maskz_loadu_ps(tail, w + full), odd);
    }
    out[n] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
  }
}

// out [rows, weight's out] = x [rows, in] @ weight [out, in]^T (plus bias, may be null)
inline void float_rows_product(float* out, const float* x, int64_t rows,
                               const at::Tensor& weight, const float* bias) {
  constexpr int64_t kGrain = 64;  // output rows a thread takes at least
  const int64_t out_width = weight.size(0), in = weight.size(1);
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* row_out = out + r * out_width;
    at::parallel_for(0, out_width, kGrain, [&](int64_t begin, int64_t end) {
      float_dots(row_out, x + r * in, w, in, begin, end);
      if (bias) {
        for (int64_t n = begin; n < end; ++n) row_out[n] += bias[n];
      }
    });
  }
}

}  // namespace
