// Host-side interface of the CUDA kernels: one launcher per op and input dtype, explicitly instantiated in
// the per-dtype .cu files so that each nvcc job stays small. Plain C++: register.cpp includes it.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

#include "attention/backend.h"
#include "attention/params.h"

namespace mha_ext::cuda {

// Largest E and Ev the kernels take: their tiles keep whole rows of Q, K, V in shared memory.
constexpr int kMaxHeadDim = 256;

// Each runs on torch's current stream of the current device (register_backend.h sets the device).
template <typename scalar_t>
void run_forward(const AttentionParams& p);
// fp16/bf16 forward on tensor cores on sm80 and newer (forward_mma_kernel.cuh), every head dim up to 256
// on every such part. kMasked: the variant for calls whose scores need per-element reads or random numbers
// (scores_need_masking). Runs only where forward_mma_unavailable says nothing stands against it on the
// current device (the build has an sm80+ image). Instantiated for c10::Half and c10::BFloat16 only.
template <typename scalar_t, bool kMasked>
void run_forward_mma(const AttentionParams& p);
template <typename scalar_t, bool kMasked>
std::string forward_mma_unavailable(const AttentionParams& p);
// A bool or float mask, a bias or dropout: anything but causality and a positive scale (the plain kernels
// fold the scale into the exponent, and take the largest dot product for the largest score).
inline bool scores_need_masking(const AttentionParams& p) {
  return p.has_bool_mask || p.mask_add_type != AdditiveType::kNone || p.bias_type != AdditiveType::kNone ||
         p.dropout.active || !(p.scale > 0);
}
template <typename scalar_t>
void run_backward(const AttentionGradParams& g);
// The same for the backward (backward_mma_kernel.cuh), every head dim up to 256 on every sm80+ part.
template <typename scalar_t, bool kMasked>
void run_backward_mma(const AttentionGradParams& g);
template <typename scalar_t, bool kMasked>
std::string backward_mma_unavailable(const AttentionParams& p);
template <typename scalar_t>
void run_weights(const AttentionParams& p, void* weights);
void run_dropout_mask(const AttentionParams& p, bool* keep);

// The kernels of each op for a runtime input dtype, as backend.h's ForwardKernel / BackwardKernel /
// WeightsKernel take them (dispatch.cpp).
void dispatch_forward(const AttentionParams& p, at::ScalarType dtype);
void dispatch_backward(const AttentionGradParams& g, at::ScalarType dtype);
void dispatch_weights(const AttentionParams& p, at::ScalarType dtype, void* weights);

// Why the tensor-core kernels do not run the forward (or the backward) of this call on the current device,
// in words; empty where they do. The one decision dispatch_forward / dispatch_backward and explain_cuda use.
std::string tensor_cores_unavailable(bool backward, const AttentionParams& p, at::ScalarType dtype);

// What dispatch_forward and dispatch_backward run for a call on the current device, and why (explain.cu).
Explanation explain_cuda(const AttentionParams& p, at::ScalarType dtype);

// The CUDA backend (dispatch.cpp): register.cpp binds it to the ops, and the tests' emulator does too.
extern const Backend kCudaBackend;

}  // namespace mha_ext::cuda
