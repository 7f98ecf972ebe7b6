// The op contract, shared by every backend: argument validation and the translation of user tensors
// (any leading dims, GQA heads, broadcast masks, strided views) into AttentionParams.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "attention/params.h"

namespace mha_ext {

// "(2, 3, 5)": how error messages print shapes, the same way Python does.
std::string shape_str(at::IntArrayRef sizes);

struct PreparedAttention {
  AttentionParams params;
  at::Tensor query, key, value;   // possibly copied to give a unit stride along the last dim
  std::vector<at::Tensor> alive;  // broadcast views whose strides the params point into
  std::vector<int64_t> out_shape; // (..., Hq, L, Ev)
  std::vector<int64_t> lse_shape; // (..., Hq, L)
  std::vector<int64_t> scores_shape;  // (..., Hq, L, S)
};

// Validates the inputs (raising with the argument's name, the expected and the actual value) and
// fills params without the output pointers.
PreparedAttention prepare_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const std::optional<at::Tensor>& attn_mask,
                                    const std::optional<at::Tensor>& attn_bias, bool is_causal, double scale);

// Validates dropout_p (in [0, 1]) and rng_state (int64 [seed, offset], required when dropout_p > 0).
DropoutRule dropout_rule(double dropout_p, const std::optional<at::Tensor>& rng_state);

// Describes a (..., Hq, L, C) tensor laid out like the query (grad_output) on the prepared grid.
Operand query_like_operand(const PreparedAttention& prepared, const at::Tensor& tensor, const char* name,
                           int64_t cols, at::Tensor& keep_alive);

// Describes a tensor of the scores' shape (..., Hq, L, S), any strides (stride 0 where it broadcasts),
// on the prepared grid.
Operand scores_operand(const PreparedAttention& prepared, const at::Tensor& tensor);

}  // namespace mha_ext
