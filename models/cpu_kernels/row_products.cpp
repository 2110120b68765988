// The kernels' row products as ops of their own, for one-row products outside the decode
// kernels (the output layer's, and those of a step the kernels do not run):
// torch.ops.mmgpt.int8_linear (int8_rows.h, VNNI), for models/cpu_weights.FbgemmInt8Weight,
// and torch.ops.mmgpt.float_linear (float_rows.h, AVX-512), for float32 weights.

#include <torch/library.h>

#include "float_rows.h"
#include "int8_rows.h"

namespace {

void check_rows(const at::Tensor& x, int64_t in, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in && x.scalar_type() == at::kFloat &&
                  x.is_contiguous() && x.device().is_cpu(),
              op, ": x must be contiguous float32 [rows, in] on the CPU");
}

const float* checked_bias(const c10::optional<at::Tensor>& bias, int64_t out, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
              op, ": bias must be contiguous float32 [out]");
  return bias->data_ptr<float>();
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                       double activation_scale, int64_t zero_point) {
  const Int8Rows m = int8_rows(weight, scales, offsets);
  check_rows(x, m.in, "int8_linear");
  const float* bias_data = checked_bias(bias, m.out, "int8_linear");
  at::Tensor out = at::empty({x.size(0), m.out}, x.options());
  const auto rounding = ActivationRounding::of(activation_scale, zero_point);
  int8_rows_product(out.data_ptr<float>(), x.data_ptr<float>(), x.size(0), m, rounding,
                    bias_data);
  return out;
}

bool int8_linear_available() { return cpu_has_vnni(); }

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_has_avx512(), "float_linear needs AVX-512");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous() && weight.device().is_cpu(),
              "float_linear: a contiguous float32 [out, in] weight on the CPU");
  const int64_t out = weight.size(0);
  check_rows(x, weight.size(1), "float_linear");
  const float* bias_data = checked_bias(bias, out, "float_linear");
  at::Tensor result = at::empty({x.size(0), out}, x.options());
  float_rows_product(result.data_ptr<float>(), x.data_ptr<float>(), x.size(0), weight,
                     bias_data);
  return result;
}

bool float_linear_available() { return cpu_has_avx512(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.def(
      "int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor offsets, Tensor? bias, "
      "float activation_scale, int zero_point) -> Tensor",
      TORCH_FN(int8_linear));
  m.def("int8_linear_available() -> bool", TORCH_FN(int8_linear_available));
  m.def("float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", TORCH_FN(float_linear));
  m.def("float_linear_available() -> bool", TORCH_FN(float_linear_available));
}
