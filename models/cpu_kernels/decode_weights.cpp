// torch.classes.mmgpt.DecodeWeights (decode_step.h): built and checked here, and
// registered once for every kernel.

#include <torch/library.h>

#include "decode_step.h"

namespace mmgpt {

namespace {

constexpr size_t kTensorsPerInt8Rows = 3;  // weight, scales, offsets

std::vector<Int8Rows> row_views(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(tensors.size() % kTensorsPerInt8Rows == 0, "int8 rows: three tensors a matrix");
  std::vector<Int8Rows> matrices;
  for (size_t i = 0; i < tensors.size(); i += kTensorsPerInt8Rows) {
    matrices.push_back(int8_rows(tensors[i], tensors[i + 1], tensors[i + 2]));
  }
  return matrices;
}

}  // namespace

DecodeWeights::DecodeWeights(std::vector<c10::optional<at::Tensor>> tensors,
                             std::vector<c10::IValue> int8, bool reduce_range,
                             std::vector<at::Tensor> int8_rows, double activation_scale,
                             int64_t zero_point, bool weight_major)
    : tensors(std::move(tensors)),
      int8(std::move(int8)),
      reduce_range(reduce_range),
      int8_rows(std::move(int8_rows)),
      int8_row_matrices(row_views(this->int8_rows)),
      rounding(ActivationRounding::of(activation_scale, zero_point)),
      weight_major(weight_major) {
  for (const auto& weight : this->tensors) {
    if (weight.has_value() && weight->defined()) {
      TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                      weight->device().is_cpu(),
                  "weights must be contiguous float32 on the CPU");
    }
  }
}

}  // namespace mmgpt

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.class_<mmgpt::DecodeWeights>("DecodeWeights")
      .def(torch::init<std::vector<c10::optional<at::Tensor>>, std::vector<c10::IValue>, bool,
                       std::vector<at::Tensor>, double, int64_t, bool>());
}
