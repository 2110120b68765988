// torch.classes.mmgpt.DecodeWeights (decode_step.h): registered here, once for every kernel.

#include <torch/library.h>

#include "decode_step.h"

TORCH_LIBRARY_FRAGMENT(mmgpt, m) {
  m.class_<mmgpt::DecodeWeights>("DecodeWeights")
      .def(torch::init<std::vector<c10::optional<at::Tensor>>, std::vector<c10::IValue>, bool,
                       std::vector<at::Tensor>, double, int64_t, bool>());
}
