#include "attention/entry.h"

#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "attention/contract.h"
#include "attention/explanation.h"

namespace mha_ext {
namespace {

void check_saved(const at::Tensor& t, const char* name, const std::vector<int64_t>& shape, at::ScalarType dtype,
                 const at::Tensor& query) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "mha_ext: ", name, " must have shape ", shape_str(shape), ", got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "mha_ext: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == query.device(), "mha_ext: ", name, " must be on the query's device ", query.device(),
                    ", got ", t.device());
}

// d loss / d (a broadcast additive input) is the scores' gradient summed over the dims it broadcasts on.
at::Tensor reduce_to(const at::Tensor& grad_scores, const std::optional<at::Tensor>& input, const char* name) {
  TORCH_CHECK_VALUE(input.has_value() && input->defined() && input->is_floating_point(), "mha_ext: a gradient for ",
                    name, " was requested, but ", name, " is not a floating tensor");
  return at::sum_to(grad_scores, input->sizes()).to(input->scalar_type());
}

std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last) {
  shape.back() = last;
  return shape;
}

// The backend's kernels hold whole rows of the head dims in fast memory, up to its max_head_dim.
void check_head_dims(const Backend& backend, const at::Tensor& query, const std::optional<at::Tensor>& value) {
  if (backend.max_head_dim == 0) return;
  TORCH_CHECK_VALUE(query.size(-1) <= backend.max_head_dim, "mha_ext: on ", backend.name,
                    ", query's head dim E (last dim) must be at most ", backend.max_head_dim, ", got ", query.size(-1));
  TORCH_CHECK_VALUE(!value.has_value() || value->size(-1) <= backend.max_head_dim, "mha_ext: on ", backend.name,
                    ", value's head dim Ev (last dim) must be at most ", backend.max_head_dim, ", got ",
                    value->size(-1));
}

// Sets to 1 the leading (batch, head) dims of `shape` (the scores') along which every tensor broadcasts.
void shrink_to_broadcast_dims(std::vector<int64_t>& shape, const std::vector<at::Tensor>& tensors) {
  const int64_t rank = static_cast<int64_t>(shape.size());
  for (int64_t d = 0; d < rank - 2; ++d) {
    const bool broadcast = std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor& t) {
      const int64_t td = d - (rank - t.dim());
      return td < 0 || t.size(td) == 1;
    });
    if (broadcast) shape[d] = 1;
  }
}

}  // namespace

at::ScalarType accumulation_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> attention_forward(const Backend& backend, const at::Tensor& query,
                                                     const at::Tensor& key, const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
                                                     double scale, double dropout_p,
                                                     const std::optional<at::Tensor>& rng_state) {
  PreparedAttention prep = prepare_attention(query, key, value, attn_mask, attn_bias, causal, scale);
  check_head_dims(backend, query, value);
  prep.params.dropout = dropout_rule(dropout_p, rng_state, prep);
  at::Tensor out = at::empty(prep.out_shape, query.options());
  at::Tensor lse = at::empty(prep.lse_shape, query.options().dtype(accumulation_dtype(query.scalar_type())));
  // With an empty value head dim the kernel still computes the LSE, next to one zero column of output.
  at::Tensor kernel_out = prep.empty_v_dim ? at::empty(with_last(prep.out_shape, 1), query.options()) : out;
  prep.params.out = kernel_out.data_ptr();
  prep.params.lse = lse.data_ptr();
  if (lse.numel() > 0) backend.forward(prep.params, query.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool mask_requires_grad, bool bias_requires_grad,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  PreparedAttention prep = prepare_attention(query, key, value, attn_mask, attn_bias, causal, scale);
  check_head_dims(backend, query, value);
  prep.params.dropout = dropout_rule(dropout_p, rng_state, prep);
  const at::ScalarType acc = accumulation_dtype(query.scalar_type());
  check_saved(output, "output", prep.out_shape, query.scalar_type(), query);
  check_saved(lse, "lse", prep.lse_shape, acc, query);
  const at::Tensor out_c = prep.empty_v_dim ? at::zeros(with_last(prep.out_shape, 1), output.options())
                                            : output.contiguous();
  const at::Tensor lse_c = lse.contiguous();

  AttentionGradParams g;
  g.fwd = prep.params;
  g.fwd.out = const_cast<void*>(out_c.data_ptr());
  g.fwd.lse = const_cast<void*>(lse_c.data_ptr());
  at::Tensor grad_lse_c;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_saved(*grad_lse, "grad_lse", prep.lse_shape, acc, query);
    grad_lse_c = grad_lse->contiguous();
    g.grad_lse = grad_lse_c.data_ptr();
  }
  at::Tensor grad_out_alive;
  g.grad_out = output_like_operand(prep, grad_output, "grad_output", grad_out_alive);

  // Gradients on the broadcast grid, summed to each input's shape below (a no-op where nothing broadcasts).
  std::vector<int64_t> grad_query_shape(prep.lse_shape);
  grad_query_shape.push_back(prep.params.E);
  at::Tensor grad_query = at::zeros(grad_query_shape, query.options().dtype(acc));
  at::Tensor grad_key = at::empty(prep.grad_key_shape, key.options());
  at::Tensor grad_value = at::empty(prep.grad_value_shape, value.options());
  at::Tensor grad_scores;
  if (mask_requires_grad || bias_requires_grad) {
    std::vector<int64_t> slab_shape = prep.scores_shape;
    if (backend.grad_scores_layout == GradScoresLayout::kSharedWhereBroadcast) {
      std::vector<at::Tensor> needing_grad;
      if (mask_requires_grad && attn_mask.has_value()) needing_grad.push_back(*attn_mask);
      if (bias_requires_grad && attn_bias.has_value()) needing_grad.push_back(*attn_bias);
      shrink_to_broadcast_dims(slab_shape, needing_grad);
    }
    const at::TensorOptions options = query.options().dtype(acc);
    grad_scores = backend.grad_scores_zeros != nullptr ? backend.grad_scores_zeros(slab_shape, options)
                                                       : at::zeros(slab_shape, options);
    g.grad_scores = scores_operand(prep, grad_scores);
  }
  g.grad_query = grad_query.data_ptr();
  g.grad_key = grad_key.data_ptr();
  g.grad_value = grad_value.data_ptr();
  if (grad_key.numel() > 0 || grad_query.numel() > 0) backend.backward(g, query.scalar_type());

  // Outputs must not alias each other: each absent gradient gets its own empty tensor.
  auto none = [&] { return at::empty({0}, query.options()); };
  // An empty head dim has empty gradients; the zero columns standing in for it get none.
  auto summed_to = [](const at::Tensor& grad, const at::Tensor& input, bool empty_dim) {
    return empty_dim ? at::zeros(input.sizes(), input.options()) : at::sum_to(grad, input.sizes()).to(input.scalar_type());
  };
  return {summed_to(grad_query, query, prep.empty_qk_dim), summed_to(grad_key, key, prep.empty_qk_dim),
          summed_to(grad_value, value, prep.empty_v_dim),
          mask_requires_grad ? reduce_to(grad_scores, attn_mask, "attn_mask") : none(),
          bias_requires_grad ? reduce_to(grad_scores, attn_bias, "attn_bias") : none()};
}

at::Tensor attention_weights(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                             const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                             const at::Tensor& lse, c10::string_view causal, double scale) {
  // The weights do not involve the values; the key stands in for them so the contract checks the rest.
  PreparedAttention prep = prepare_attention(query, key, key, attn_mask, attn_bias, causal, scale);
  check_head_dims(backend, query, std::nullopt);
  check_saved(lse, "lse", prep.lse_shape, accumulation_dtype(query.scalar_type()), query);
  const at::Tensor lse_c = lse.contiguous();
  prep.params.lse = const_cast<void*>(lse_c.data_ptr());
  at::Tensor weights = at::zeros(prep.scores_shape, query.options());
  if (weights.numel() > 0) backend.weights(prep.params, query.scalar_type(), weights.data_ptr());
  return weights;
}

at::Tensor attention_dropout_mask(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                                  double dropout_p, const at::Tensor& rng_state) {
  // Only the shapes matter: the key stands in for the values.
  PreparedAttention prep = prepare_attention(query, key, key, std::nullopt, std::nullopt, "none", 1.0);
  prep.params.dropout = dropout_rule(dropout_p, rng_state, prep);
  at::Tensor keep = at::ones(prep.scores_shape, query.options().dtype(at::kBool));
  if (prep.params.dropout.active && keep.numel() > 0) backend.dropout_mask(prep.params, keep.data_ptr<bool>());
  return keep;
}

std::string attention_explain(const Backend& backend, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& attn_bias, c10::string_view causal, double dropout_p) {
  PreparedAttention prep = prepare_attention(query, key, value, attn_mask, attn_bias, causal, 1.0);
  check_head_dims(backend, query, value);
  check_dropout_p(dropout_p);
  prep.params.dropout = make_dropout_rule(dropout_p, 0, 0);  // the rule's presence, not its draws, matters here
  return explanation_json(backend.name, backend.explain(prep.params, query.scalar_type()));
}

}  // namespace mha_ext
