// What the decode kernels share: vector loops, the products, the paged cache, attention.
//
// A kernel runs every layer of one decode step in float32: its products through ATen
// (MKL, on torch's threads) in the orientation the model chose, everything between them
// as plain loops over the step's rows.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "float_rows.h"
#include "int8_rows.h"

namespace mmgpt {

// A decoder's weights as its kernel reads them (models/fused_decode.KernelWeights), checked
// once when built (decode_weights.cpp): a step then passes one object, not hundreds of list
// items to convert.
struct DecodeWeights : torch::CustomClassHolder {
  // per layer, in its weights dataclass's field order: float32 tensors, none for a weight
  // the layer lacks and for an int8 matrix
  std::vector<c10::optional<at::Tensor>> tensors;
  std::vector<c10::IValue> int8;  // FBGEMM's packed int8 matrices, four a layer, or none
  bool reduce_range;              // how FBGEMM rounds their activations
  // the same matrices for the VNNI product (weight, scales, offsets a matrix), or none,
  // and the product's view of each
  std::vector<at::Tensor> int8_rows;
  std::vector<Int8Rows> int8_row_matrices;
  ActivationRounding rounding;
  bool weight_major;  // float32 products take one row as weight @ row

  DecodeWeights(std::vector<c10::optional<at::Tensor>> tensors, std::vector<c10::IValue> int8,
                bool reduce_range, std::vector<at::Tensor> int8_rows, double activation_scale,
                int64_t zero_point, bool weight_major);
};

}  // namespace mmgpt

namespace {

#define MMGPT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// dot and axpy run inside attention's loops: inlined there, compiled for its clone's target
inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out += weight * x
inline void axpy(float* out, float weight, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += weight * x[i];
}

// out = x / divisor (a true division, as torch.div)
MMGPT_SIMD_CLONES void divide(float* out, const float* x, float divisor, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / divisor;
}

MMGPT_SIMD_CLONES void multiply(float* x, float factor, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

// out = silu(gate) * up
MMGPT_SIMD_CLONES void silu_times(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// out = gelu(x), GPT-2's tanh approximation (gelu_new) or the exact one
MMGPT_SIMD_CLONES void gelu(float* out, const float* x, int64_t n, bool tanh_approximation) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f, kSqrtHalf = 0.7071067811865476f;
  if (tanh_approximation) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float cubic = x[i] + 0.044715f * x[i] * x[i] * x[i];
      out[i] = 0.5f * x[i] * (1.f + std::tanh(kSqrt2OverPi * cubic));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * kSqrtHalf));
  }
}

// out = x / rms(x) * scale (scale may be null: no scale), statistics in float32
MMGPT_SIMD_CLONES void rms_norm(float* out, const float* x, const float* scale, int64_t n,
                                double eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
  if (scale == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inverse;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inverse * scale[i];
  }
}

// out = (x - mean(x)) / std(x) * scale + bias, the variance biased, as F.layer_norm
MMGPT_SIMD_CLONES void layer_norm(float* out, const float* x, const float* scale,
                                  const float* bias, int64_t n, double eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inverse * scale[i] + bias[i];
}

// One product's result [rows, out] as read back: plain ([rows, out]) or weight-major
// ([out, columns], a row is a column).
struct ProductRows {
  at::Tensor result;
  int64_t row_stride, column_stride;
  int64_t first_row = 0;  // rows of `result` before the step's first (int8's fixed row)

  const float* row(int64_t r) const {
    return result.data_ptr<float>() + (r + first_row) * row_stride;
  }
  float at(int64_t r, int64_t j) const { return row(r)[j * column_stride]; }
  int64_t width() const { return column_stride == 1 ? result.size(1) : result.size(0); }
};

// FBGEMM's int8 product of models/cpu_weights.FbgemmInt8Weight, as its `linear` computes
// it: each row scaled to a largest magnitude of 1 behind a fixed [-1, 1] row, so that the
// activations' one quantisation range is [-1, 1] whatever the batch; then scaled back.
ProductRows int8_product(const at::Tensor& inputs, int64_t num_rows, const c10::IValue& packed,
                         bool reduce_range, at::Tensor& scaled) {
  static const auto linear_dynamic =
      c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
  const int64_t width = inputs.size(1);
  if (!scaled.defined() || scaled.size(0) != num_rows + 1 || scaled.size(1) != width) {
    scaled = at::zeros({num_rows + 1, width}, inputs.options());
    scaled.data_ptr<float>()[0] = -1.f;
    scaled.data_ptr<float>()[1] = 1.f;
  }
  std::vector<float> peaks(num_rows);
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* row = inputs.data_ptr<float>() + r * width;
    peaks[r] = row_peak(row, width);
    divide(scaled.data_ptr<float>() + (r + 1) * width, row, peaks[r], width);
  }
  std::vector<c10::IValue> stack{scaled, packed, reduce_range};
  linear_dynamic.callBoxed(&stack);
  at::Tensor result = stack[0].toTensor();  // [rows + 1, out], the fixed row first
  const int64_t out_width = result.size(1);
  for (int64_t r = 0; r < num_rows; ++r) {
    multiply(result.data_ptr<float>() + (r + 1) * out_width, peaks[r], out_width);
  }
  return {result, out_width, 1, 1};
}

// How a kernel multiplies a layer's matrices: float32 ones by the row product of
// float_rows.h where the CPU has AVX-512, else through ATen in the orientation the model
// chose for its rows; int8 ones (kMatricesPerLayer a layer) by the VNNI row product where
// they come as rows (`int8_rows`), else through FBGEMM (`int8`).
constexpr int64_t kMatricesPerLayer = 4;
struct Products {
  const mmgpt::DecodeWeights& weights;
  bool float_rows = cpu_has_avx512();  // float32 products by float_rows.h, else through ATen
  // int8's scaled rows, one buffer per matrix of a layer (so per input width), kept for
  // the step
  mutable std::vector<at::Tensor> scaled_rows = std::vector<at::Tensor>(kMatricesPerLayer);

  explicit Products(const mmgpt::DecodeWeights& weights) : weights(weights) {}

  bool is_int8() const { return !weights.int8.empty() || !weights.int8_row_matrices.empty(); }

  // inputs: [columns, in] with the step's rows first and zeros after them; `plain` the
  // float matrix, undefined for an int8 one; `index` the matrix's place in its layer.
  ProductRows operator()(const at::Tensor& inputs, int64_t num_rows,
                         const c10::optional<at::Tensor>& plain, size_t layer,
                         int64_t index) const {
    const size_t matrix = layer * kMatricesPerLayer + index;
    if (!weights.int8_row_matrices.empty()) {
      const Int8Rows& m = weights.int8_row_matrices[matrix];
      at::Tensor result = at::empty({num_rows, m.out}, inputs.options());
      int8_rows_product(result.data_ptr<float>(), inputs.data_ptr<float>(), num_rows, m,
                        weights.rounding, nullptr);
      return {result, m.out, 1};
    }
    if (!weights.int8.empty()) {
      return int8_product(inputs, num_rows, weights.int8[matrix], weights.reduce_range,
                          scaled_rows[index]);
    }
    const at::Tensor& weight = *plain;
    if (float_rows) {
      at::Tensor result = at::empty({num_rows, weight.size(0)}, inputs.options());
      float_rows_product(result.data_ptr<float>(), inputs.data_ptr<float>(), num_rows, weight,
                         nullptr);
      return {result, weight.size(0), 1};
    }
    if (weights.weight_major) {
      at::Tensor result = at::mm(weight, inputs.t());  // [out, columns]
      return {result, 1, inputs.size(0)};
    }
    at::Tensor result = at::mm(inputs.narrow(0, 0, num_rows), weight.t());  // [rows, out]
    return {result, result.size(1), 1};
  }

  // Weight-major float products read one row as two (MKL's one-column GEMV runs on one
  // core); the other forms take the rows as they are.
  int64_t columns(int64_t rows) const {
    return weights.weight_major && !is_int8() && !float_rows ? std::max<int64_t>(rows, 2) : rows;
  }
};

// The step's working rows, each [columns, width]: the products' inputs.
struct StepBuffers {
  at::Tensor normed, attended, activated;

  StepBuffers(const at::Tensor& hidden, int64_t attended_width, const Products& products) {
    const int64_t columns = products.columns(hidden.size(0));
    normed = at::zeros({columns, hidden.size(1)}, hidden.options());
    attended = at::zeros({columns, attended_width}, hidden.options());
  }

  // The MLP's inner rows, made once its first product says how wide they are.
  float* activated_rows(const at::Tensor& hidden, int64_t width) {
    if (!activated.defined()) {
      activated = at::zeros({normed.size(0), width}, hidden.options());
    }
    return activated.data_ptr<float>();
  }
};

// hidden [rows, width] += product + bias (bias may be null)
void add_product(float* hidden, int64_t rows, int64_t width, const ProductRows& product,
                 const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = hidden + r * width;
    for (int64_t j = 0; j < width; ++j) row[j] += product.at(r, j) + (bias ? bias[j] : 0.f);
  }
}

const float* data_or_null(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? tensor->data_ptr<float>() : nullptr;
}

struct Shapes {
  int64_t heads, kv_heads, head_dim, block_size, blocks_per_seq;
};

Shapes cache_shapes(const at::Tensor& k_cache, int64_t heads, int64_t rows,
                    const at::Tensor& block_ids) {
  return {heads, k_cache.size(2), k_cache.size(3), k_cache.size(1), block_ids.size(0) / rows};
}

// The step's sequences: where each new token goes, and where each sequence's tokens lie in
// a layer's cache [blocks, block_size, kv_heads, D]; every layer's cache has the same
// blocks, so the offsets are worked out once a step.
struct Sequences {
  const int64_t* slots;                       // [rows]
  std::vector<std::vector<int64_t>> offsets;  // per row, each token's at its first KV head
  int64_t total = 0, longest = 0;             // tokens over all rows, and in the longest

  Sequences(const at::Tensor& slot_mapping, const at::Tensor& block_ids,
            c10::IntArrayRef lengths, const Shapes& s)
      : slots(slot_mapping.data_ptr<int64_t>()) {
    const int64_t* blocks = block_ids.data_ptr<int64_t>();
    const int64_t token_width = s.kv_heads * s.head_dim;
    for (size_t r = 0; r < lengths.size(); ++r) {
      std::vector<int64_t> row(lengths[r]);
      for (int64_t t = 0; t < lengths[r]; ++t) {
        const int64_t block = blocks[r * s.blocks_per_seq + t / s.block_size];
        row[t] = (block * s.block_size + t % s.block_size) * token_width;
      }
      offsets.push_back(std::move(row));
      total += lengths[r];
      longest = std::max(longest, lengths[r]);
    }
  }
};

// q, k and v of one row in their final form (biased, normed, rotated), one after another:
// [heads + 2 * kv_heads] heads of D.
struct RowQkv {
  std::vector<float> values;
  int64_t q_width, kv_width;

  RowQkv(const Shapes& s)
      : values((s.heads + 2 * s.kv_heads) * s.head_dim),
        q_width(s.heads * s.head_dim),
        kv_width(s.kv_heads * s.head_dim) {}

  float* data() { return values.data(); }
  const float* q() const { return values.data(); }
  const float* k() const { return q() + q_width; }
  const float* v() const { return k() + kv_width; }
};

// Row r of the q/k/v product, plus its bias (may be null).
RowQkv biased_row(const ProductRows& qkv, int64_t r, const float* bias, const Shapes& s) {
  RowQkv row(s);
  float* values = row.data();
  for (int64_t j = 0; j < static_cast<int64_t>(row.values.size()); ++j) {
    values[j] = qkv.at(r, j) + (bias ? bias[j] : 0.f);
  }
  return row;
}

void write_kv(const RowQkv& row, float* k_cache, float* v_cache, int64_t slot) {
  std::copy(row.k(), row.k() + row.kv_width, k_cache + slot * row.kv_width);
  std::copy(row.v(), row.v() + row.kv_width, v_cache + slot * row.kv_width);
}

// One span of a row's attention (flash-decoding's split): for each query head, the
// largest score over the span's tokens, the sum of exp(score - largest), and the sum of
// the values weighted by those exps. The spans of a row merge into its softmax.
struct SpanResult {
  float* data;  // [heads, D + 2]: a head's weighted values, then its largest score and sum
  int64_t d;
  float* values(int64_t h) const { return data + h * (d + 2); }
  float& largest(int64_t h) const { return data[h * (d + 2) + d]; }
  float& total(int64_t h) const { return data[h * (d + 2) + d + 1]; }
};

// Every query head of a row (queries [heads, D]) over the tokens at `offsets[begin, end)`
// (into the caches, at their first KV head): a token's keys and values are read once, all
// KV heads together, in the order they lie in memory. scores: room for [heads, end - begin].
// kHeadDim: D where it is known when compiling (the loops over D then unroll), 0 for
// `head_dim` at run time.
template <int64_t kHeadDim>
inline void attend_span_sized(const SpanResult& result, const float* queries, const Shapes& s,
                              const float* k_cache, const float* v_cache,
                              const std::vector<int64_t>& offsets, int64_t begin, int64_t end,
                              float scale, float* scores) {
  const int64_t d = kHeadDim > 0 ? kHeadDim : s.head_dim;
  const int64_t length = end - begin, group = s.heads / s.kv_heads;
  for (int64_t t = 0; t < length; ++t) {
    const float* keys = k_cache + offsets[begin + t];
    for (int64_t h = 0; h < s.heads; ++h) {
      scores[h * length + t] = dot(queries + h * d, keys + h / group * d, d) * scale;
    }
  }
  for (int64_t h = 0; h < s.heads; ++h) {
    float* head_scores = scores + h * length;
    float highest = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) highest = std::max(highest, head_scores[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < length; ++t) {
      head_scores[t] = std::exp(head_scores[t] - highest);
      total += head_scores[t];
    }
    result.largest(h) = highest;
    result.total(h) = total;
    std::fill(result.values(h), result.values(h) + d, 0.f);
  }
  for (int64_t t = 0; t < length; ++t) {
    const float* values = v_cache + offsets[begin + t];
    for (int64_t h = 0; h < s.heads; ++h) {
      axpy(result.values(h), scores[h * length + t], values + h / group * d, d);
    }
  }
}

MMGPT_SIMD_CLONES void attend_span(const SpanResult& result, const float* queries,
                                   const Shapes& s, const float* k_cache, const float* v_cache,
                                   const std::vector<int64_t>& offsets, int64_t begin,
                                   int64_t end, float scale, float* scores) {
  switch (s.head_dim) {  // the common head sizes
    case 64:
      attend_span_sized<64>(result, queries, s, k_cache, v_cache, offsets, begin, end, scale,
                            scores);
      break;
    case 128:
      attend_span_sized<128>(result, queries, s, k_cache, v_cache, offsets, begin, end, scale,
                             scores);
      break;
    default:
      attend_span_sized<0>(result, queries, s, k_cache, v_cache, offsets, begin, end, scale,
                           scores);
  }
}

// out [heads, D] = a row's softmax-weighted values, from its spans' results
void merge_spans(float* out, const SpanResult* spans, int64_t num_spans, int64_t heads,
                 int64_t d) {
  for (int64_t h = 0; h < heads; ++h) {
    float highest = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < num_spans; ++i) highest = std::max(highest, spans[i].largest(h));
    float* head_out = out + h * d;
    std::fill(head_out, head_out + d, 0.f);
    float total = 0.f;
    for (int64_t i = 0; i < num_spans; ++i) {
      if (spans[i].total(h) == 0.f) continue;  // a span without tokens
      const float weight = std::exp(spans[i].largest(h) - highest);
      total += spans[i].total(h) * weight;
      axpy(head_out, weight, spans[i].values(h), d);
    }
    multiply(head_out, 1.f / total, d);
  }
}

// Every row's query heads over their sequences. From `parallel_work` multiply-adds of one
// product (queries times keys) up, on torch's threads: each row's tokens cut into as many
// spans as there are threads, so that every thread reads its own part of the cache.
// out: [rows, heads * D].
void attend(float* out, const std::vector<RowQkv>& rows, const float* k_cache,
            const float* v_cache, const Sequences& seqs, const Shapes& s, float scale,
            int64_t parallel_work) {
  const int64_t d = s.head_dim, num_rows = static_cast<int64_t>(rows.size());
  const bool parallel = seqs.total * s.heads * d >= parallel_work;
  const int64_t spans_per_row = parallel ? at::get_num_threads() : 1;
  const int64_t items = num_rows * spans_per_row;
  std::vector<float> results(items * s.heads * (d + 2));
  std::vector<SpanResult> spans;
  for (int64_t item = 0; item < items; ++item) {
    spans.push_back({results.data() + item * s.heads * (d + 2), d});
  }
  at::parallel_for(0, items, parallel ? 1 : items, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / spans_per_row, span = item % spans_per_row;
      const auto& offsets = seqs.offsets[r];
      const int64_t length = static_cast<int64_t>(offsets.size());
      const int64_t first = length * span / spans_per_row;
      const int64_t last = length * (span + 1) / spans_per_row;
      scores.resize(s.heads * std::max<int64_t>(last - first, 1));
      attend_span(spans[item], rows[r].q(), s, k_cache, v_cache, offsets, first, last, scale,
                  scores.data());
    }
  });
  for (int64_t r = 0; r < num_rows; ++r) {
    merge_spans(out + r * s.heads * d, spans.data() + r * spans_per_row, spans_per_row,
                s.heads, d);
  }
}

// The step's inputs, and that the weights are a whole number of this kernel's layers.
void check_step(const at::Tensor& hidden, const Products& products, int64_t fields_per_layer,
                at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& slot_mapping,
                const at::Tensor& block_ids, c10::IntArrayRef seq_lens) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be [rows, hidden]");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.device().is_cpu(),
              "the decode kernels run float32 on the CPU");
  TORCH_CHECK(static_cast<int64_t>(seq_lens.size()) == hidden.size(0), "one length per row");
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(num_layers > 0 && v_caches.size() == k_caches.size() &&
                  static_cast<int64_t>(products.weights.tensors.size()) ==
                      num_layers * fields_per_layer,
              "one set of weights and one cache pair per layer");
  const auto& weights = products.weights;
  for (const size_t count : {weights.int8.size(), weights.int8_row_matrices.size()}) {
    TORCH_CHECK(count == 0 || static_cast<int64_t>(count) == num_layers * kMatricesPerLayer,
                "int8 matrices: none, or all four of every layer");
  }
  for (const at::TensorList& caches : {k_caches, v_caches}) {
    for (const at::Tensor& cache : caches) {
      TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.is_contiguous() && cache.dim() == 4,
                  "caches must be contiguous float32 [blocks, block_size, kv_heads, D]");
    }
  }
  for (const at::Tensor& indices : {slot_mapping, block_ids}) {
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous(),
                "slot_mapping and block_ids must be contiguous int64");
  }
}

}  // namespace
