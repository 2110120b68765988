// int8 products of a few rows with AVX-512 VNNI, computing what FBGEMM's dynamic product
// computes for models/cpu_weights.FbgemmInt8Weight: each row scaled to a largest
// magnitude of 1, rounded to 8 bits over [-1, 1], multiplied in integers against int8
// weights with one scale per output row, and scaled back.
//
// FBGEMM runs a one-row product through its blocked GEMM, quantising and packing the row
// on every call; here a row is rounded once and the weight is read row after row, in
// memory order, as byte dot products (vpdpbusd), its rows split over torch's threads.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mmgpt {  // the types a kernel's DecodeWeights holds, one for every source file

// A matrix in the form the VNNI product reads (models/cpu_weights.Int8Rows).
struct Int8Rows {
  const int8_t* weight;    // [out, in], row-major
  const float* scales;     // [out]: the activations' scale times the row's
  const int32_t* offsets;  // [out]: the activations' zero point times the row's sum
  int64_t out, in;
};

// How activations in [-1, 1] are rounded: FBGEMM's 8-bit parameters for that range, the
// scale inverted in float32 as FBGEMM's quantiser inverts it.
struct ActivationRounding {
  float inverse_scale;
  int32_t zero_point;

  static ActivationRounding of(double scale, int64_t zero_point) {
    return {1.f / static_cast<float>(scale), static_cast<int32_t>(zero_point)};
  }
};

}  // namespace mmgpt

namespace {

using mmgpt::ActivationRounding;
using mmgpt::Int8Rows;

inline bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
}

inline Int8Rows int8_rows(const at::Tensor& weight, const at::Tensor& scales,
                          const at::Tensor& offsets) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int8 rows: a contiguous int8 [out, in] weight");
  const int64_t out = weight.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == out,
              "int8 rows: one float32 scale per output row");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() &&
                  offsets.numel() == out,
              "int8 rows: one int32 offset per output row");
  return {weight.data_ptr<int8_t>(), scales.data_ptr<float>(), offsets.data_ptr<int32_t>(),
          out, weight.size(1)};
}

// A row's largest magnitude, at least 1e-30 so that an all-zero row stays zero: what
// FbgemmInt8Weight.linear scales each row by before FBGEMM rounds it.
__attribute__((target_clones("avx512f", "avx2", "default"))) float row_peak(const float* x,
                                                                            int64_t n) {
  float peak = 0.f;
#pragma omp simd reduction(max : peak)
  for (int64_t i = 0; i < n; ++i) peak = std::max(peak, std::abs(x[i]));
  return std::max(peak, 1e-30f);
}

// q = round(x / peak / scale) + zero point, clamped to a byte; returns the row's peak.
float round_row(uint8_t* q, const float* x, int64_t n, ActivationRounding rounding) {
  const float peak = row_peak(x, n);
  for (int64_t i = 0; i < n; ++i) {
    // the scaled row as FbgemmInt8Weight.linear divides it, then FBGEMM's rounding
    const float scaled = x[i] / peak;
    const float level = std::nearbyint(scaled * rounding.inverse_scale) +
                        static_cast<float>(rounding.zero_point);
    q[i] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, level)));
  }
  return peak;
}

// dots[n] = sum_k q[k] * weight[n][k] for the rows n in [begin, end): row after row, so
// that the weight streams from memory in order
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void byte_dots(
    int32_t* dots, const uint8_t* q, const Int8Rows& m, int64_t begin, int64_t end) {
  const int64_t pairs = m.in / 128 * 128;
  const int64_t full = m.in / 64 * 64;
  const __mmask64 tail = m.in == full ? 0 : (~0ULL >> (64 - (m.in - full)));
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* w = m.weight + n * m.in;
    __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k < pairs; k += 128) {
      even = _mm512_dpbusd_epi32(even, _mm512_loadu_si512(q + k), _mm512_loadu_si512(w + k));
      odd = _mm512_dpbusd_epi32(odd, _mm512_loadu_si512(q + k + 64),
                                _mm512_loadu_si512(w + k + 64));
    }
    for (; k < full; k += 64) {
      even = _mm512_dpbusd_epi32(even, _mm512_loadu_si512(q + k), _mm512_loadu_si512(w + k));
    }
    if (tail) {
      odd = _mm512_dpbusd_epi32(odd, _mm512_maskz_loadu_epi8(tail, q + full),
                                _mm512_maskz_loadu_epi8(tail, w + full));
    }
    dots[n] = _mm512_reduce_add_epi32(_mm512_add_epi32(even, odd));
  }
}

// out [rows, m.out] = the int8 product of x [rows, m.in] (plus bias, may be null)
inline void int8_rows_product(float* out, const float* x, int64_t rows, const Int8Rows& m,
                              ActivationRounding rounding, const float* bias) {
  TORCH_CHECK(cpu_has_vnni(), "the int8 row product needs AVX-512 VNNI");
  constexpr int64_t kGrain = 64;  // output rows a thread takes at least
  std::vector<uint8_t> q(m.in);
  std::vector<int32_t> dots(m.out);
  for (int64_t r = 0; r < rows; ++r) {
    const float peak = round_row(q.data(), x + r * m.in, m.in, rounding);
    float* row_out = out + r * m.out;
    at::parallel_for(0, m.out, kGrain, [&](int64_t begin, int64_t end) {
      byte_dots(dots.data(), q.data(), m, begin, end);
      for (int64_t n = begin; n < end; ++n) {
        // FBGEMM's float result, then FbgemmInt8Weight.linear's peak and bias
        const float value = static_cast<float>(dots[n] - m.offsets[n]) * m.scales[n] * peak;
        row_out[n] = bias ? value + bias[n] : value;
      }
    });
  }
}

}  // namespace
