// Decode steps of a Llama-family decoder on the CPU in float32, all layers in one call.
//
// A one-stream decode step of a deep, narrow model spends a third of its time dispatching
// small ops from Python (norms, rotary, the cache write, attention, the residuals: about
// fifty a layer). Here each layer is four matrix products through ATen (MKL, on torch's
// threads) and plain loops for everything between them. The numbers are those of
// models/llama.py's layer; only the order of some float sums differs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Entries per layer in the weight list, in models.llama.LlamaLayerWeights' field order.
enum Field : int64_t {
  kInputNorm,
  kQkvWeight,
  kQkvBias,
  kQkNorm,
  kOWeight,
  kOBias,
  kPostNorm,
  kGateUpWeight,
  kGateUpBias,
  kDownWeight,
  kDownBias,
  kFieldsPerLayer,
};

#define MMGPT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

MMGPT_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out += weight * x
MMGPT_SIMD_CLONES void axpy(float* out, float weight, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += weight * x[i];
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

// One product's result [rows, out] as read back: plain ([rows, out]) or weight-major
// ([out, columns], a row is a column).
struct ProductRows {
  at::Tensor result;
  int64_t row_stride, column_stride;

  const float* row(int64_t r) const { return result.data_ptr<float>() + r * row_stride; }
  float at(int64_t r, int64_t j) const { return row(r)[j * column_stride]; }
};

// inputs: [columns, in] with the step's rows first and zeros after them.
ProductRows product(const at::Tensor& inputs, int64_t num_rows, const at::Tensor& weight,
                    bool weight_major) {
  if (weight_major) {
    at::Tensor result = at::mm(weight, inputs.t());  // [out, columns]
    return {result, 1, inputs.size(0)};
  }
  at::Tensor result = at::mm(inputs.narrow(0, 0, num_rows), weight.t());  // [rows, out]
  return {result, result.size(1), 1};
}

const float* data_or_null(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? tensor->data_ptr<float>() : nullptr;
}

struct Shapes {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size, blocks_per_seq;
};

// The step's sequences: where each new token goes and which blocks hold each one.
struct Sequences {
  const int64_t* slots;       // [rows]
  const int64_t* block_ids;   // [rows * blocks_per_seq]
  c10::IntArrayRef lengths;   // tokens per sequence, this step's included
};

// q, k (rotated, QK-normed where the model norms them) and v of one row, contiguous.
struct RowQkv {
  std::vector<float> q, k, v;
};

RowQkv row_qkv(const ProductRows& qkv, int64_t r, const float* bias, const float* qk_norm,
               const float* cos, const float* signed_sin, const Shapes& s, double eps) {
  const int64_t d = s.head_dim, q_width = s.heads * d, kv_width = s.kv_heads * d;
  std::vector<float> all(q_width + 2 * kv_width);
  for (int64_t j = 0; j < static_cast<int64_t>(all.size()); ++j) {
    all[j] = qkv.at(r, j) + (bias ? bias[j] : 0.f);
  }
  std::vector<float> rotated(d);
  for (int64_t h = 0; h < s.heads + s.kv_heads; ++h) {  // query heads, then key heads
    float* head = all.data() + h * d;
    if (qk_norm != nullptr) {
      rms_norm(head, head, nullptr, d, eps);
      for (int64_t i = 0; i < d; ++i) head[i] *= qk_norm[h * d + i];
    }
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; ++i) {  // x * cos + roll(x, half) * signed_sin
      const float rolled = head[i < half ? i + half : i - half];
      rotated[i] = head[i] * cos[i] + rolled * signed_sin[i];
    }
    std::copy(rotated.begin(), rotated.end(), head);
  }
  RowQkv out;
  out.q.assign(all.begin(), all.begin() + q_width);
  out.k.assign(all.begin() + q_width, all.begin() + q_width + kv_width);
  out.v.assign(all.begin() + q_width + kv_width, all.end());
  return out;
}

// Offset of token t of sequence r's K/V in a cache [blocks, block_size, kv_heads, D].
int64_t token_offset(const Sequences& seqs, const Shapes& s, int64_t r, int64_t t) {
  const int64_t block = seqs.block_ids[r * s.blocks_per_seq + t / s.block_size];
  return ((block * s.block_size) + t % s.block_size) * s.kv_heads * s.head_dim;
}

// Softmax attention of query head h of row r over its sequence; out [D].
void attend_head(float* out, const float* query, const float* k_cache, const float* v_cache,
                 const Sequences& seqs, const Shapes& s, int64_t r, int64_t h, float scale,
                 std::vector<float>& scores) {
  const int64_t d = s.head_dim, length = seqs.lengths[r];
  const int64_t kv_head = (h / (s.heads / s.kv_heads)) * d;
  scores.resize(length);
  float highest = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = dot(query, k_cache + token_offset(seqs, s, r, t) + kv_head, d) * scale;
    highest = std::max(highest, scores[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = std::exp(scores[t] - highest);
    total += scores[t];
  }
  std::fill(out, out + d, 0.f);
  for (int64_t t = 0; t < length; ++t) {
    axpy(out, scores[t] / total, v_cache + token_offset(seqs, s, r, t) + kv_head, d);
  }
}

// Every row's query heads over their sequences; on torch's threads from `parallel_work`
// multiply-adds of one product (queries times keys) up. out: [rows, heads * D].
void attend(float* out, const std::vector<RowQkv>& rows, const float* k_cache,
            const float* v_cache, const Sequences& seqs, const Shapes& s, float scale,
            int64_t parallel_work) {
  const int64_t items = static_cast<int64_t>(rows.size()) * s.heads, d = s.head_dim;
  int64_t work = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) work += seqs.lengths[r];
  const int64_t grain = work * s.heads * d < parallel_work ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / s.heads, h = item % s.heads;
      attend_head(out + (r * s.heads + h) * d, rows[r].q.data() + h * d, k_cache, v_cache, seqs,
                  s, r, h, scale, scores);
    }
  });
}

void check_inputs(const at::Tensor& hidden, const std::vector<c10::optional<at::Tensor>>& weights,
                  const at::TensorList& k_caches, const at::TensorList& v_caches) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be [rows, hidden]");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.device().is_cpu(),
              "llama_decode runs float32 on the CPU");
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * kFieldsPerLayer &&
                  v_caches.size() == k_caches.size(),
              "one set of weights and one cache pair per layer");
  for (const at::TensorList& caches : {k_caches, v_caches}) {
    for (const at::Tensor& cache : caches) {
      TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.is_contiguous() && cache.dim() == 4,
                  "caches must be contiguous float32 [blocks, block_size, kv_heads, D]");
    }
  }
  for (const auto& weight : weights) {
    if (weight.has_value() && weight->defined()) {
      TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous(),
                  "weights must be contiguous float32");
    }
  }
}

at::Tensor llama_decode(const at::Tensor& hidden_in, const at::Tensor& cos,
                        const at::Tensor& signed_sin,
                        const std::vector<c10::optional<at::Tensor>>& weights,
                        at::TensorList k_caches, at::TensorList v_caches,
                        const at::Tensor& slot_mapping, const at::Tensor& block_ids,
                        c10::IntArrayRef seq_lens, int64_t num_heads, double eps, double scale,
                        bool weight_major, int64_t parallel_attention_work) {
  check_inputs(hidden_in, weights, k_caches, v_caches);
  for (const at::Tensor& table : {cos, signed_sin}) {
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() &&
                    table.size(0) == hidden_in.size(0) && table.size(1) == k_caches[0].size(3),
                "cos and signed_sin must be contiguous float32 [rows, head_dim]");
  }
  for (const at::Tensor& indices : {slot_mapping, block_ids}) {
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous(),
                "slot_mapping and block_ids must be contiguous int64");
  }
  at::Tensor hidden = hidden_in.clone();
  const int64_t rows = hidden.size(0);
  const at::Tensor& first_k = k_caches[0];
  Shapes s{hidden.size(1), num_heads, first_k.size(2), first_k.size(3),
           weights[kGateUpWeight]->size(0) / 2, first_k.size(1), block_ids.size(0) / rows};
  Sequences seqs{slot_mapping.data_ptr<int64_t>(), block_ids.data_ptr<int64_t>(), seq_lens};
  TORCH_CHECK(static_cast<int64_t>(seq_lens.size()) == rows, "one length per row");
  // Row-major inputs of each product; weight-major pads one row to two with zeros, since
  // a single column would take MKL's one-core GEMV.
  const int64_t columns = weight_major ? std::max<int64_t>(rows, 2) : rows;
  at::Tensor normed = at::zeros({columns, s.hidden}, hidden.options());
  at::Tensor attended = at::zeros({columns, s.heads * s.head_dim}, hidden.options());
  at::Tensor activated = at::zeros({columns, s.intermediate}, hidden.options());
  float* h = hidden.data_ptr<float>();
  const float* cos_rows = cos.data_ptr<float>();
  const float* sin_rows = signed_sin.data_ptr<float>();
  const int64_t kv_width = s.kv_heads * s.head_dim;

  for (size_t layer = 0; layer < k_caches.size(); ++layer) {
    auto w = [&](Field field) -> const c10::optional<at::Tensor>& {
      return weights[layer * kFieldsPerLayer + field];
    };
    float* k_cache = k_caches[layer].data_ptr<float>();
    float* v_cache = v_caches[layer].data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      rms_norm(normed.data_ptr<float>() + r * s.hidden, h + r * s.hidden,
               w(kInputNorm)->data_ptr<float>(), s.hidden, eps);
    }
    ProductRows qkv = product(normed, rows, *w(kQkvWeight), weight_major);
    std::vector<RowQkv> new_rows;
    for (int64_t r = 0; r < rows; ++r) {
      new_rows.push_back(row_qkv(qkv, r, data_or_null(w(kQkvBias)), data_or_null(w(kQkNorm)),
                                 cos_rows + r * s.head_dim, sin_rows + r * s.head_dim, s, eps));
      const int64_t slot = seqs.slots[r] * kv_width;
      std::copy(new_rows[r].k.begin(), new_rows[r].k.end(), k_cache + slot);
      std::copy(new_rows[r].v.begin(), new_rows[r].v.end(), v_cache + slot);
    }
    attend(attended.data_ptr<float>(), new_rows, k_cache, v_cache, seqs, s,
           static_cast<float>(scale), parallel_attention_work);
    ProductRows out = product(attended, rows, *w(kOWeight), weight_major);
    const float* o_bias = data_or_null(w(kOBias));
    for (int64_t r = 0; r < rows; ++r) {
      float* hr = h + r * s.hidden;
      for (int64_t j = 0; j < s.hidden; ++j) hr[j] += out.at(r, j) + (o_bias ? o_bias[j] : 0.f);
      rms_norm(normed.data_ptr<float>() + r * s.hidden, hr, w(kPostNorm)->data_ptr<float>(),
               s.hidden, eps);
    }
    ProductRows gate_up = product(normed, rows, *w(kGateUpWeight), weight_major);
    const float* gate_up_bias = data_or_null(w(kGateUpBias));
    for (int64_t r = 0; r < rows; ++r) {
      float* act = activated.data_ptr<float>() + r * s.intermediate;
      for (int64_t j = 0; j < s.intermediate; ++j) {
        float gate = gate_up.at(r, j), up = gate_up.at(r, j + s.intermediate);
        if (gate_up_bias != nullptr) {
          gate += gate_up_bias[j];
          up += gate_up_bias[j + s.intermediate];
        }
        act[j] = gate / (1.f + std::exp(-gate)) * up;  // silu(gate) * up
      }
    }
    ProductRows down = product(activated, rows, *w(kDownWeight), weight_major);
    const float* down_bias = data_or_null(w(kDownBias));
    for (int64_t r = 0; r < rows; ++r) {
      float* hr = h + r * s.hidden;
      for (int64_t j = 0; j < s.hidden; ++j) {
        hr[j] += down.at(r, j) + (down_bias ? down_bias[j] : 0.f);
      }
    }
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY(mmgpt, m) {
  m.def(
      "llama_decode(Tensor hidden, Tensor cos, Tensor signed_sin, Tensor?[] weights, "
      "Tensor[] k_caches, Tensor[] v_caches, Tensor slot_mapping, Tensor block_ids, "
      "int[] seq_lens, int num_heads, float eps, float scale, bool weight_major, "
      "int parallel_attention_work) -> Tensor",
      TORCH_FN(llama_decode));
}
