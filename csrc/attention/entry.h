// Device-independent bodies of the ops: validate through the contract, allocate the outputs, run the
// backend's kernel, and shape the results. Each backend registers these with its own kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "attention/params.h"

namespace mha_ext {

using ForwardKernel = void (*)(const AttentionParams&, at::ScalarType);
using BackwardKernel = void (*)(const AttentionGradParams&, at::ScalarType);
using WeightsKernel = void (*)(const AttentionParams&, at::ScalarType, void* weights);
using DropoutMaskKernel = void (*)(const AttentionParams&, bool* keep);

// How the score gradient (AttentionGradParams::grad_scores) is laid out for a backend's backward kernel:
// one (L, S) slab per batch-head, or one per distinct slab of the masks needing a gradient, shared by the
// batch-heads they broadcast over (the kernel adds those up without races; no (grid, L, S) buffer).
enum class GradScoresLayout { kPerBatchHead, kSharedWhereBroadcast };

// Allocates the zero-filled score gradient; nullptr: at::zeros.
using GradScoresZeros = at::Tensor (*)(at::IntArrayRef shape, const at::TensorOptions& options);

// Accumulation dtype of the kernels for inputs of `dtype`: float64 for float64, else float32.
at::ScalarType accumulation_dtype(at::ScalarType dtype);

// Returns (output (..., H, L, Ev), lse (..., H, L)), H and the other leading dims broadcast across the inputs.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
                                                     double scale, double dropout_p,
                                                     const std::optional<at::Tensor>& rng_state, ForwardKernel kernel);

// Returns (grad_query, grad_key, grad_value, grad_attn_mask, grad_attn_bias), each of its input's shape
// (summed over the dims it broadcasts along); the last two are empty tensors unless requested.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
    const at::Tensor& output, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, c10::string_view causal,
    double scale, bool mask_requires_grad, bool bias_requires_grad, double dropout_p,
    const std::optional<at::Tensor>& rng_state, BackwardKernel kernel, GradScoresLayout grad_scores_layout,
    GradScoresZeros grad_scores_zeros = nullptr);

// Softmax probabilities (..., H, L, S) recomputed from the saved LSE; rows with nothing to attend are 0.
at::Tensor attention_weights(const at::Tensor& query, const at::Tensor& key,
                             const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                             const at::Tensor& lse, c10::string_view causal, double scale, WeightsKernel kernel);

// The dropout decisions a call with this dropout_p and rng_state makes: bool (..., H, L, S), True = kept.
at::Tensor attention_dropout_mask(const at::Tensor& query, const at::Tensor& key, double dropout_p,
                                  const at::Tensor& rng_state, DropoutMaskKernel kernel);

}  // namespace mha_ext
