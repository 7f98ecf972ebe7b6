// Large zero-filled buffers on transparent huge pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace mha_ext::cpu {

// at::zeros(shape, options), with the memory of a tensor of at least kHugePageMinBytes advised to
// transparent huge pages (Linux, where THP is in "madvise" or "always" mode) before it is first written.
at::Tensor zeros_on_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace mha_ext::cpu
