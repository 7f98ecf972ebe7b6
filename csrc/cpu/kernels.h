// The CPU kernels of the ops, as entry.h's ForwardKernel / BackwardKernel / WeightsKernel / DropoutMaskKernel
// take them; register.cpp binds them to the ops.
#pragma once

#include <c10/core/ScalarType.h>

#include "attention/params.h"

namespace mha_ext::cpu {

void forward_cpu(const AttentionParams& p, at::ScalarType dtype);
void backward_cpu(const AttentionGradParams& g, at::ScalarType dtype);
void weights_cpu(const AttentionParams& p, at::ScalarType dtype, void* weights);
void dropout_mask_cpu(const AttentionParams& p, bool* keep);

}  // namespace mha_ext::cpu
