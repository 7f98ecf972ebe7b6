// The CPU kernels of the ops and their kernel choices, as backend.h's Backend takes them; register.cpp
// makes the CPU Backend of them.
#pragma once

#include <c10/core/ScalarType.h>

#include "attention/backend.h"
#include "attention/params.h"

namespace mha_ext::cpu {

void forward_cpu(const AttentionParams& p, at::ScalarType dtype);
void backward_cpu(const AttentionGradParams& g, at::ScalarType dtype);
void weights_cpu(const AttentionParams& p, at::ScalarType dtype, void* weights);
void dropout_mask_cpu(const AttentionParams& p, bool* keep);

// The paths forward_cpu and backward_cpu take for a call, and why not the others (explain.cpp joins them).
KernelChoice explain_forward_cpu(const AttentionParams& p, at::ScalarType dtype);
KernelChoice explain_backward_cpu(const AttentionParams& p, at::ScalarType dtype);
Explanation explain_cpu(const AttentionParams& p, at::ScalarType dtype);

}  // namespace mha_ext::cpu
