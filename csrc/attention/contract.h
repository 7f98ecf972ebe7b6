// The op contract, shared by every backend: argument validation and the translation of user tensors
// (any leading dims, broadcast batch and head dims, GQA heads, broadcast masks, strided views) into
// AttentionParams.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

#include "attention/params.h"

namespace mha_ext {

// "(2, 3, 5)": how error messages print shapes, the same way Python does.
std::string shape_str(at::IntArrayRef sizes);

// The leading dims of a call (everything before L and E / S) broadcast across query, key and value, with
// the head dim (dim -3, where there is one) split into (kv_heads, group): query head h = kv_head * group + g.
struct LeadingDims {
  std::vector<int64_t> sizes;  // the output's leading dims
  bool has_heads = false;
  int64_t kv_heads = 1;
  int64_t group = 1;
};

struct PreparedAttention {
  LeadingDims lead;
  AttentionParams params;         // E and Ev at least 1: an empty head dim is run as one zero column
  at::Tensor query, key, value;   // what params point into: the inputs, copies with a unit last-dim
                                  // stride, or zero columns standing in for an empty head dim
  bool empty_qk_dim = false;      // the user's E is 0: every score is 0 (before masks)
  bool empty_v_dim = false;       // the user's Ev is 0: the output is empty, the LSE is not
  // Shapes: the leading dims broadcast across query, key and value (the heads: query's, or key/value's
  // when the query has one head).
  std::vector<int64_t> out_shape;       // (..., H, L, Ev), the user's Ev
  std::vector<int64_t> lse_shape;       // (..., H, L)
  std::vector<int64_t> scores_shape;    // (..., H, L, S)
  std::vector<int64_t> grad_key_shape;  // (..., Hkv, S, params.E): one row block per kv batch-head
  std::vector<int64_t> grad_value_shape;  // (..., Hkv, S, params.Ev)
};

// The causal rule for `causal`: "none", "upper_left" (torch's is_causal=True) or "lower_right"; raises a
// ValueError naming the argument for anything else.
CausalRule causal_rule(c10::string_view causal, int64_t L, int64_t S);

// Validates the inputs (raising with the argument's name, the expected and the actual value) and
// fills params without the output pointers.
PreparedAttention prepare_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const std::optional<at::Tensor>& attn_mask,
                                    const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
                                    double scale);

// A ValueError naming dropout_p unless it is in [0, 1].
void check_dropout_p(double dropout_p);

// Validates dropout_p (in [0, 1]) and rng_state (required when dropout_p > 0): int64 [seed, offset], or
// [seed, offset, row_offset, column_offset, head_offset, total_heads] for a call that is a slice of a larger
// one and makes that call's decisions for its pairs (DropoutRule in philox.h).
DropoutRule dropout_rule(double dropout_p, const std::optional<at::Tensor>& rng_state, const PreparedAttention& prep);

// Describes a tensor of the output's shape (grad_output) on the prepared grid; `keep_alive` holds what the
// operand points into.
Operand output_like_operand(const PreparedAttention& prepared, const at::Tensor& tensor, const char* name,
                            at::Tensor& keep_alive);

// Describes a tensor broadcastable to the scores' shape (..., H, L, S), any strides, on the prepared grid
// (stride 0 wherever it broadcasts).
Operand scores_operand(const PreparedAttention& prepared, const at::Tensor& tensor);

}  // namespace mha_ext
