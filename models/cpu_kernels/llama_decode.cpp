// A decode step of a Llama-family decoder (Llama, Qwen2's q/k/v bias, Qwen3's QK-norm)
// on the CPU in float32, all layers in one call: the numbers of models/llama.py's layer,
// only the order of some float sums differs.

#include <torch/library.h>

#include "decode_step.h"

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

// One row's q, k and v: biased, QK-normed where the model norms them, then rotated.
RowQkv llama_row_qkv(const ProductRows& qkv, int64_t r, const float* bias, const float* qk_norm,
                     const float* cos, const float* signed_sin, const Shapes& s, double eps) {
  const int64_t d = s.head_dim, half = d / 2;
  RowQkv row = biased_row(qkv, r, bias, s);
  std::vector<float> rotated(d);
  for (int64_t h = 0; h < s.heads + s.kv_heads; ++h) {  // query heads, then key heads
    float* head = row.data() + h * d;
    if (qk_norm != nullptr) {
      rms_norm(head, head, nullptr, d, eps);
      for (int64_t i = 0; i < d; ++i) head[i] *= qk_norm[h * d + i];
    }
    for (int64_t i = 0; i < d; ++i) {  // x * cos + roll(x, half) * signed_sin
      const float rolled = head[i < half ? i + half : i - half];
      rotated[i] = head[i] * cos[i] + rolled * signed_sin[i];
    }
    std::copy(rotated.begin(), rotated.end(), head);
  }
  return row;
}

// activated [rows, inter] = silu(gate) * up, from gate_up's [gate | up] columns
void silu_and_mul(float* activated, const ProductRows& gate_up, const float* bias, int64_t rows,
                  int64_t inter) {
  std::vector<float> biased(2 * inter);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < 2 * inter; ++j) biased[j] = gate_up.at(r, j) + (bias ? bias[j] : 0.f);
    silu_times(activated + r * inter, biased.data(), biased.data() + inter, inter);
  }
}

at::Tensor llama_decode(const at::Tensor& hidden_in, const at::Tensor& cos,
                        const at::Tensor& signed_sin,
                        const c10::intrusive_ptr<mmgpt::DecodeWeights>& decode_weights,
                        at::TensorList k_caches, at::TensorList v_caches,
                        const at::Tensor& slot_mapping, const at::Tensor& block_ids,
                        c10::IntArrayRef seq_lens, int64_t num_heads, double eps, double scale,
                        int64_t parallel_attention_work) {
  const Products product(*decode_weights);
  check_step(hidden_in, product, kFieldsPerLayer, k_caches, v_caches, slot_mapping, block_ids,
             seq_lens);
  const auto& weights = decode_weights->tensors;
  const int64_t rows = hidden_in.size(0), width = hidden_in.size(1);
  const Shapes s = cache_shapes(k_caches[0], num_heads, rows, block_ids);
  for (const at::Tensor& table : {cos, signed_sin}) {
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() &&
                    table.size(0) == rows && table.size(1) == s.head_dim,
                "cos and signed_sin must be contiguous float32 [rows, head_dim]");
  }
  const Sequences seqs(slot_mapping, block_ids, seq_lens, s);
  at::Tensor hidden = hidden_in.clone();
  StepBuffers buffers(hidden, s.heads * s.head_dim, product);
  float* h = hidden.data_ptr<float>();
  float* normed = buffers.normed.data_ptr<float>();

  for (size_t layer = 0; layer < k_caches.size(); ++layer) {
    auto w = [&](Field field) -> const c10::optional<at::Tensor>& {
      return weights[layer * kFieldsPerLayer + field];
    };
    float* k_cache = k_caches[layer].data_ptr<float>();
    float* v_cache = v_caches[layer].data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      rms_norm(normed + r * width, h + r * width, w(kInputNorm)->data_ptr<float>(), width, eps);
    }
    const ProductRows qkv = product(buffers.normed, rows, w(kQkvWeight), layer, 0);
    std::vector<RowQkv> new_rows;
    for (int64_t r = 0; r < rows; ++r) {
      new_rows.push_back(llama_row_qkv(qkv, r, data_or_null(w(kQkvBias)),
                                       data_or_null(w(kQkNorm)),
                                       cos.data_ptr<float>() + r * s.head_dim,
                                       signed_sin.data_ptr<float>() + r * s.head_dim, s, eps));
      write_kv(new_rows[r], k_cache, v_cache, seqs.slots[r]);
    }
    attend(buffers.attended.data_ptr<float>(), new_rows, k_cache, v_cache, seqs, s,
           static_cast<float>(scale), parallel_attention_work);
    add_product(h, rows, width, product(buffers.attended, rows, w(kOWeight), layer, 1),
                data_or_null(w(kOBias)));
    for (int64_t r = 0; r < rows; ++r) {
      rms_norm(normed + r * width, h + r * width, w(kPostNorm)->data_ptr<float>(), width, eps);
    }
    const ProductRows gate_up = product(buffers.normed, rows, w(kGateUpWeight), layer, 2);
    const int64_t inter = gate_up.width() / 2;
    silu_and_mul(buffers.activated_rows(hidden, inter), gate_up, data_or_null(w(kGateUpBias)),
                 rows, inter);
    add_product(h, rows, width, product(buffers.activated, rows, w(kDownWeight), layer, 3),
                data_or_null(w(kDownBias)));
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.def(
      "llama_decode(Tensor hidden, Tensor cos, Tensor signed_sin, "
      "__torch__.torch.classes.mmgpt.DecodeWeights weights, Tensor[] k_caches, "
      "Tensor[] v_caches, Tensor slot_mapping, Tensor block_ids, int[] seq_lens, "
      "int num_heads, float eps, float scale, int parallel_attention_work) -> Tensor",
      TORCH_FN(llama_decode));
}
