// Variable-length (packed) attention, FlashAttention's varlen layout: the sequences of a batch laid end to end
// in query (total_q, Hq, E), key (total_k, Hkv, E) and value (total_k, Hkv, Ev), sequence n being rows
// [cu_seqlens_q[n], cu_seqlens_q[n + 1]) of the query and [cu_seqlens_k[n], cu_seqlens_k[n + 1]) of key and
// value. Each sequence runs as one call of the dense op (entry.h) on views of the packed tensors, so work and
// memory follow sum(L_n * S_n), never (sum L_n)^2, and every rule of the dense op (masks, causality, dropout,
// GQA, empty rows) holds per sequence. register_backend.h binds these bodies to ops.cpp's varlen schemas.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "attention/backend.h"

namespace mha_ext {

// Returns (output (total_q, H, Ev), lse (H, total_q)). attn_mask (bool, True = attend, or floating, added) and
// attn_bias (floating, added) broadcast to (batch, H, max_seqlen_q, max_seqlen_k): sequence n reads
// [n, :, :L_n, :S_n] of them (the padded layout; a size-1 batch dim shares one mask or bias across the
// sequences). causal applies per sequence, in its alignment. rng_state: int64 [seed, offset]; the dropout
// decisions are keyed by the packed row and column, so they do not depend on how the batch was split.
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const Backend& backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state);

// Returns (grad_query, grad_key, grad_value, grad_attn_mask, grad_attn_bias), each of its input's shape; the
// last two are empty unless requested. A mask or bias shared across sequences gets their gradients added in
// sequence order (deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool mask_requires_grad, bool bias_requires_grad,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state);

}  // namespace mha_ext
