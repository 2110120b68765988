// A decode step of GPT-2 on the CPU in float32, all layers in one call: the numbers of
// models/gpt2.py's layer (layer norms, biased products, no rotary, a GELU MLP), only the
// order of some float sums differs.

#include <torch/library.h>

#include "decode_step.h"

namespace {

// Entries per layer in the weight list: models.gpt2.GPT2LayerWeights' (weight, bias)
// pairs, flattened in field order.
enum Field : int64_t {
  kNorm1,
  kNorm1Bias,
  kQkvWeight,
  kQkvBias,
  kOutWeight,
  kOutBias,
  kNorm2,
  kNorm2Bias,
  kFcInWeight,
  kFcInBias,
  kFcOutWeight,
  kFcOutBias,
  kFieldsPerLayer,
};

at::Tensor gpt2_decode(const at::Tensor& hidden_in,
                       const c10::intrusive_ptr<mmgpt::DecodeWeights>& decode_weights,
                       c10::ArrayRef<double> scales, at::TensorList k_caches,
                       at::TensorList v_caches, const at::Tensor& slot_mapping,
                       const at::Tensor& block_ids, c10::IntArrayRef seq_lens, int64_t num_heads,
                       double eps, bool tanh_gelu, int64_t parallel_attention_work) {
  const Products product(*decode_weights);
  check_step(hidden_in, product, kFieldsPerLayer, k_caches, v_caches, slot_mapping, block_ids,
             seq_lens);
  const auto& weights = decode_weights->tensors;
  TORCH_CHECK(scales.size() == k_caches.size(), "one attention scale per layer");
  const int64_t rows = hidden_in.size(0), width = hidden_in.size(1);
  const Shapes s = cache_shapes(k_caches[0], num_heads, rows, block_ids);
  const Sequences seqs(slot_mapping, block_ids, seq_lens, s);
  at::Tensor hidden = hidden_in.clone();
  StepBuffers buffers(hidden, s.heads * s.head_dim, product);
  float* h = hidden.data_ptr<float>();

  for (size_t layer = 0; layer < k_caches.size(); ++layer) {
    auto w = [&](Field field) -> const c10::optional<at::Tensor>& {
      return weights[layer * kFieldsPerLayer + field];
    };
    auto bias = [&](Field field) {
      TORCH_CHECK(w(field).has_value() && w(field)->defined(), "GPT-2's norms and biases");
      return w(field)->data_ptr<float>();
    };
    auto norm_rows = [&](Field scale, Field shift) {
      for (int64_t r = 0; r < rows; ++r) {
        layer_norm(buffers.normed.data_ptr<float>() + r * width, h + r * width, bias(scale),
                   bias(shift), width, eps);
      }
    };
    float* k_cache = k_caches[layer].data_ptr<float>();
    float* v_cache = v_caches[layer].data_ptr<float>();
    norm_rows(kNorm1, kNorm1Bias);
    const ProductRows qkv = product(buffers.normed, rows, w(kQkvWeight), layer, 0);
    std::vector<RowQkv> new_rows;
    for (int64_t r = 0; r < rows; ++r) {
      new_rows.push_back(biased_row(qkv, r, bias(kQkvBias), s));
      write_kv(new_rows[r], k_cache, v_cache, seqs.slots[r]);
    }
    attend(buffers.attended.data_ptr<float>(), new_rows, k_cache, v_cache, seqs, s,
           static_cast<float>(scales[layer]), parallel_attention_work);
    add_product(h, rows, width, product(buffers.attended, rows, w(kOutWeight), layer, 1),
                bias(kOutBias));
    norm_rows(kNorm2, kNorm2Bias);
    const ProductRows fc_in = product(buffers.normed, rows, w(kFcInWeight), layer, 2);
    const int64_t inner = fc_in.width();
    float* activated = buffers.activated_rows(hidden, inner);
    const float* fc_in_bias = bias(kFcInBias);
    std::vector<float> biased(inner);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < inner; ++j) biased[j] = fc_in.at(r, j) + fc_in_bias[j];
      gelu(activated + r * inner, biased.data(), inner, tanh_gelu);
    }
    add_product(h, rows, width, product(buffers.activated, rows, w(kFcOutWeight), layer, 3),
                bias(kFcOutBias));
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.def(
      "gpt2_decode(Tensor hidden, __torch__.torch.classes.mmgpt.DecodeWeights weights, "
      "float[] scales, Tensor[] k_caches, Tensor[] v_caches, Tensor slot_mapping, "
      "Tensor block_ids, int[] seq_lens, int num_heads, float eps, bool tanh_gelu, "
      "int parallel_attention_work) -> Tensor",
      TORCH_FN(gpt2_decode));
}
