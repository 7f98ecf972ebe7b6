// Device-independent bodies of the ops: validate through the contract, allocate the outputs, run the
// backend's kernel, and shape the results. register_backend.h binds them, with a Backend, to the schemas of
// ops.cpp: these signatures are the schemas' in C++ (after the Backend).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

#include "attention/backend.h"

namespace mha_ext {

// Accumulation dtype of the kernels for inputs of `dtype`: float64 for float64, else float32.
at::ScalarType accumulation_dtype(at::ScalarType dtype);

// Returns (output (..., H, L, Ev), lse (..., H, L)), H and the other leading dims broadcast across the inputs.
std::tuple<at::Tensor, at::Tensor> attention_forward(const Backend& backend, const at::Tensor& query,
                                                     const at::Tensor& key, const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
                                                     double scale, double dropout_p,
                                                     const std::optional<at::Tensor>& rng_state);

// Returns (grad_query, grad_key, grad_value, grad_attn_mask, grad_attn_bias), each of its input's shape
// (summed over the dims it broadcasts along); the last two are empty tensors unless requested.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool mask_requires_grad, bool bias_requires_grad,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state);

// Softmax probabilities (..., H, L, S) recomputed from the saved LSE; rows with nothing to attend are 0.
at::Tensor attention_weights(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                             const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                             const at::Tensor& lse, c10::string_view causal, double scale);

// The dropout decisions a call with this dropout_p and rng_state makes: bool (..., H, L, S), True = kept.
at::Tensor attention_dropout_mask(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                                  double dropout_p, const at::Tensor& rng_state);

// Which kernels a forward and a backward with these arguments run on this backend, their tiles, and why the
// other paths are not taken: JSON text, {"backend": ..., "forward": {"kernel", "tiles", "not_taken": {...}},
// "backward": {...}, "facts": {...}}.
std::string attention_explain(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& attn_bias, c10::string_view causal, double dropout_p);

}  // namespace mha_ext
