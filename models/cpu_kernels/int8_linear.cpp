// torch.ops.mmgpt.int8_linear: a few rows' int8 product with VNNI (int8_rows.h), the form
// models/cpu_weights.FbgemmInt8Weight uses for one-row products outside the decode
// kernels (the output layer's, and every product of a step the kernels do not run).

#include <torch/library.h>

#include "int8_rows.h"

namespace {

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                       double activation_scale, int64_t zero_point) {
  const Int8Rows m = int8_rows(weight, scales, offsets);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == m.in && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(),
              "int8_linear: x must be contiguous float32 [rows, in]");
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == m.out,
                "int8_linear: bias must be contiguous float32 [out]");
    bias_data = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({x.size(0), m.out}, x.options());
  const ActivationRounding rounding{1.f / static_cast<float>(activation_scale),
                                    static_cast<int32_t>(zero_point)};
  int8_rows_product(out.data_ptr<float>(), x.data_ptr<float>(), x.size(0), m, rounding,
                    bias_data);
  return out;
}

bool int8_linear_available() { return cpu_has_vnni(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.def(
      "int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor offsets, Tensor? bias, "
      "float activation_scale, int zero_point) -> Tensor",
      TORCH_FN(int8_linear));
  m.def("int8_linear_available() -> bool", TORCH_FN(int8_linear_available));
}
