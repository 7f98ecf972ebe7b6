// Host-side interface of the CUDA kernels: one launcher per op and input dtype, explicitly instantiated in
// the per-dtype .cu files so that each nvcc job stays small. Plain C++: register.cpp includes it.
#pragma once

#include "attention/params.h"

namespace mha_ext::cuda {

// Largest E and Ev the kernels take: their tiles keep whole rows of Q, K, V in shared memory.
constexpr int kMaxHeadDim = 256;

// Each runs on torch's current stream of the current device (register.cpp sets the device).
template <typename scalar_t>
void run_forward(const AttentionParams& p);
// fp16/bf16 forward on tensor cores, for E, Ev <= kMaxTensorCoreHeadDim on sm80 and newer. Runs it and
// returns true where this call, the device and the build allow it; otherwise does nothing and returns
// false, and the caller runs run_forward. Instantiated for c10::Half and c10::BFloat16 only.
constexpr int kMaxTensorCoreHeadDim = 128;
template <typename scalar_t>
bool try_forward_tensor_cores(const AttentionParams& p);
template <typename scalar_t>
void run_backward(const AttentionGradParams& g);
template <typename scalar_t>
void run_weights(const AttentionParams& p, void* weights);
void run_dropout_mask(const AttentionParams& p, bool* keep);

}  // namespace mha_ext::cuda
