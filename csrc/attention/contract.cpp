#include "attention/contract.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

namespace mha_ext {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device(const at::Tensor& query, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == query.device(), "mha_ext: ", name, " must be on the query's device ",
                    query.device(), ", got ", t.device());
}

// The kernels need unit stride along the last dim and non-overlapping rows (BLAS leading dims).
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  const bool last_ok = t.size(-1) <= 1 || t.stride(-1) == 1;
  const bool rows_ok = t.size(-2) <= 1 || t.stride(-2) >= t.size(-1);
  return last_ok && rows_ok ? t : t.contiguous();
}

// Size of `t` along dim d of a rank-`rank` shape that t's dims right-align with; 1 where t lacks it.
int64_t aligned_size(const at::Tensor& t, int64_t rank, int64_t d) {
  const int64_t td = d - (rank - t.dim());
  return td < 0 ? 1 : t.size(td);
}

// torch's broadcast of one dim: the sizes must be equal or 1; `ok` turns false where they are not.
int64_t broadcast_dim(std::initializer_list<int64_t> sizes, bool& ok) {
  int64_t out = 1;
  for (int64_t s : sizes) {
    if (s == 1) continue;
    if (out != 1 && out != s) ok = false;
    out = s;
  }
  return out;
}

LeadingDims broadcast_leading_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t rank = std::max({q.dim(), k.dim(), v.dim()});
  const int64_t n_lead = rank - 2;
  LeadingDims lead;
  lead.has_heads = n_lead >= 1;
  auto shapes = [&] {
    return "got query " + shape_str(q.sizes()) + ", key " + shape_str(k.sizes()) + ", value " + shape_str(v.sizes());
  };
  for (int64_t d = 0; d < n_lead; ++d) {
    const int64_t sq = aligned_size(q, rank, d), sk = aligned_size(k, rank, d), sv = aligned_size(v, rank, d);
    bool ok = true;
    if (!lead.has_heads || d < n_lead - 1) {
      lead.sizes.push_back(broadcast_dim({sq, sk, sv}, ok));
      TORCH_CHECK_VALUE(ok, "mha_ext: batch dim ", d - rank, " must be equal or 1 across query, key and value ",
                        "(they broadcast as in torch); ", shapes());
      continue;
    }
    const int64_t hkv = broadcast_dim({sk, sv}, ok);
    TORCH_CHECK_VALUE(ok, "mha_ext: key and value must have the same number of heads (dim -3), or one of them 1; ",
                      shapes());
    if (sq == 0 && hkv <= 1) {  // no heads
      lead.kv_heads = 0;
    } else if (hkv == 1) {  // one key/value head, shared by every query head
      lead.group = sq;
    } else if (sq == hkv || sq == 1) {  // as many heads, or one query head broadcast over them
      lead.kv_heads = hkv;
    } else {
      TORCH_CHECK_VALUE(hkv > 0 && sq % hkv == 0, "mha_ext: query heads (dim -3) must equal the key/value heads, ",
                        "be a multiple of them (grouped-query attention) or 1, or key and value have 1 head; ",
                        shapes());
      lead.kv_heads = hkv;
      lead.group = sq / hkv;
    }
    lead.sizes.push_back(lead.kv_heads * lead.group);
  }
  return lead;
}

// Binds tensors onto the batch grid of a call: the leading dims with the head dim split into
// (kv_heads, group), size-1 dims dropped.
class GridBinder {
 public:
  explicit GridBinder(const LeadingDims& lead) : lead_(lead) {
    const int64_t n_lead = static_cast<int64_t>(lead.sizes.size());
    for (int64_t d = 0; d < n_lead; ++d) {
      if (lead.has_heads && d == n_lead - 1) {
        split_.push_back(lead.kv_heads);
        split_.push_back(lead.group);
      } else {
        split_.push_back(lead.sizes[d]);
      }
    }
  }

  BatchGrid grid(at::IntArrayRef query_sizes) const {
    BatchGrid g;
    for (int64_t s : split_) {
      g.numel *= s;
      if (s == 1) continue;
      TORCH_CHECK_VALUE(g.ndim < kMaxGridDims, "mha_ext: the inputs have too many batch dims of size > 1 (at most ",
                        kMaxGridDims - 2, " besides the head dim), got query shape ", shape_str(query_sizes));
      g.sizes[g.ndim++] = s;
    }
    g.group = lead_.group;
    return g;
  }

  // Binds a tensor whose dims right-align with (leading dims..., rows, cols): stride 0 along the leading
  // dims it lacks or has size 1 in. `broadcast_rows_cols`: the same for rows and columns (masks); otherwise
  // their strides are the tensor's own (query, key, value: BLAS leading dims).
  Operand bind(const at::Tensor& t, bool broadcast_rows_cols) const {
    Operand op;
    const int64_t n_lead = static_cast<int64_t>(lead_.sizes.size());
    const int64_t rank = n_lead + 2;
    int out = 0;
    size_t split_dim = 0;
    auto put = [&](int64_t stride) {
      if (split_[split_dim++] != 1) op.grid_strides[out++] = stride;
    };
    for (int64_t d = 0; d < n_lead; ++d) {
      const int64_t size = aligned_size(t, rank, d);
      const int64_t stride = size == 1 ? 0 : t.stride(d - (rank - t.dim()));
      if (lead_.has_heads && d == n_lead - 1) {
        const bool all_heads = size == lead_.sizes[d] && size != 1;
        put(all_heads ? stride * lead_.group : stride);  // kv head
        put(all_heads ? stride : 0);                     // position within the group: 0 for key/value heads
      } else {
        put(stride);
      }
    }
    auto inner_stride = [&](int64_t back) {
      if (t.dim() < back) return int64_t(0);
      return broadcast_rows_cols && t.size(-back) == 1 ? int64_t(0) : t.stride(-back);
    };
    op.data = t.data_ptr();
    op.row_stride = inner_stride(2);
    op.col_stride = inner_stride(1);
    return op;
  }

 private:
  LeadingDims lead_;
  std::vector<int64_t> split_;
};

// A (rows, 1) column of zeros in `like`'s dtype and device: what an empty head dim is run as.
at::Tensor zero_column(const at::Tensor& like, int64_t rows) { return at::zeros({rows, 1}, like.options()); }

std::vector<int64_t> with_tail(std::vector<int64_t> lead, std::initializer_list<int64_t> tail) {
  lead.insert(lead.end(), tail);
  return lead;
}

}  // namespace

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

CausalRule causal_rule(c10::string_view causal, int64_t L, int64_t S) {
  if (causal == "none") return CausalRule{};
  if (causal == "upper_left") return CausalRule{true, 0};
  TORCH_CHECK_VALUE(causal == "lower_right", "mha_ext: causal must be \"none\", \"upper_left\" or \"lower_right\", got \"",
                    std::string(causal.data(), causal.size()), "\"");
  return CausalRule{true, S - L};
}

PreparedAttention prepare_attention(const at::Tensor& query_in, const at::Tensor& key_in,
                                    const at::Tensor& value_in, const std::optional<at::Tensor>& attn_mask,
                                    const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
                                    double scale) {
  for (const auto& [t, name] : {std::pair{&query_in, "query"}, {&key_in, "key"}, {&value_in, "value"}}) {
    TORCH_CHECK_VALUE(t->dim() >= 2, "mha_ext: ", name, " must have at least 2 dims (..., ",
                      t == &query_in ? "L, E" : (t == &key_in ? "S, E" : "S, Ev"), "), got shape ",
                      shape_str(t->sizes()));
  }
  TORCH_CHECK_TYPE(is_supported_dtype(query_in.scalar_type()),
                   "mha_ext: query must be float32, float64, bfloat16 or float16, got ", query_in.scalar_type());
  TORCH_CHECK_TYPE(key_in.scalar_type() == query_in.scalar_type(), "mha_ext: key must have the query's dtype ",
                   query_in.scalar_type(), ", got ", key_in.scalar_type());
  TORCH_CHECK_TYPE(value_in.scalar_type() == query_in.scalar_type(),
                   "mha_ext: value must have the query's dtype ", query_in.scalar_type(), ", got ",
                   value_in.scalar_type());
  check_same_device(query_in, key_in, "key");
  check_same_device(query_in, value_in, "value");
  TORCH_CHECK_VALUE(std::isfinite(scale), "mha_ext: scale must be finite, got ", scale);

  const int64_t L = query_in.size(-2), E = query_in.size(-1);
  const int64_t S = key_in.size(-2), Ev = value_in.size(-1);
  TORCH_CHECK_VALUE(key_in.size(-1) == E, "mha_ext: key's last dim must equal query's head dim E = ", E,
                    ", got key shape ", shape_str(key_in.sizes()));
  TORCH_CHECK_VALUE(value_in.size(-2) == S, "mha_ext: value's sequence length (dim -2) must equal key's S = ",
                    S, ", got value shape ", shape_str(value_in.sizes()));
  PreparedAttention prep;
  prep.lead = broadcast_leading_dims(query_in, key_in, value_in);
  const LeadingDims& lead = prep.lead;
  const GridBinder binder(lead);
  prep.empty_qk_dim = E == 0;
  prep.empty_v_dim = Ev == 0;
  // An empty head dim is one zero column: all-zero scores (a softmax over the masks alone), or an output
  // of one zero column whose LSE is still that of the scores.
  prep.query = prep.empty_qk_dim ? zero_column(query_in, L) : with_unit_last_stride(query_in);
  prep.key = prep.empty_qk_dim ? zero_column(key_in, S) : with_unit_last_stride(key_in);
  prep.value = prep.empty_v_dim ? zero_column(value_in, S) : with_unit_last_stride(value_in);

  const int64_t kernel_E = std::max<int64_t>(E, 1), kernel_Ev = std::max<int64_t>(Ev, 1);
  prep.lse_shape = with_tail(lead.sizes, {L});
  prep.out_shape = with_tail(lead.sizes, {L, Ev});
  prep.scores_shape = with_tail(lead.sizes, {L, S});
  std::vector<int64_t> kv_lead = lead.sizes;
  if (lead.has_heads) kv_lead.back() = lead.kv_heads;
  prep.grad_key_shape = with_tail(kv_lead, {S, kernel_E});
  prep.grad_value_shape = with_tail(kv_lead, {S, kernel_Ev});

  AttentionParams& p = prep.params;
  p.grid = binder.grid(query_in.sizes());
  p.L = L;
  p.S = S;
  p.E = kernel_E;
  p.Ev = kernel_Ev;
  p.scale = prep.empty_qk_dim ? 1.0 : scale;
  p.causal = causal_rule(causal, L, S);
  p.query = binder.bind(prep.query, false);
  p.key = binder.bind(prep.key, false);
  p.value = binder.bind(prep.value, false);

  // Masks are bound with stride 0 along the dims they broadcast over: never expanded in memory.
  auto bind_mask = [&](const at::Tensor& m, const char* name, Operand& op) {
    check_same_device(query_in, m, name);
    const auto& scores_shape = prep.scores_shape;
    TORCH_CHECK_VALUE(m.dim() <= static_cast<int64_t>(scores_shape.size()), "mha_ext: ", name, " of shape ",
                      shape_str(m.sizes()), " is not broadcastable to the attention scores' shape ",
                      shape_str(scores_shape), ": it has more dims");
    const int64_t offset = static_cast<int64_t>(scores_shape.size()) - m.dim();
    for (int64_t d = 0; d < m.dim(); ++d) {
      TORCH_CHECK_VALUE(m.size(d) == 1 || m.size(d) == scores_shape[offset + d], "mha_ext: ", name,
                        " of shape ", shape_str(m.sizes()), " is not broadcastable to the attention scores' shape ",
                        shape_str(scores_shape), " (..., H, L, S): dim ", d, " is ", m.size(d), ", expected 1 or ",
                        scores_shape[offset + d]);
    }
    op = binder.bind(m, true);
  };
  auto additive_type = [&](const at::Tensor& m, const char* name) {
    TORCH_CHECK_TYPE(m.scalar_type() == query_in.scalar_type() || m.scalar_type() == at::kFloat, "mha_ext: ", name,
                     " must be bool (True = attend) or floating with the query's dtype ", query_in.scalar_type(),
                     " or float32, got ", m.scalar_type(),
                     m.is_floating_point() ? "" : " (for 0/1 integer masks where 1 = attend, pass mask.bool())");
    return m.scalar_type() == query_in.scalar_type() ? AdditiveType::kSameAsQuery : AdditiveType::kFloat32;
  };
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    if (m.scalar_type() == at::kBool) {
      p.has_bool_mask = true;
      bind_mask(m, "attn_mask", p.bool_mask);
    } else {
      p.mask_add_type = additive_type(m, "attn_mask");
      bind_mask(m, "attn_mask", p.mask_add);
    }
  }
  if (attn_bias.has_value() && attn_bias->defined()) {
    const at::Tensor& b = *attn_bias;
    TORCH_CHECK_TYPE(b.is_floating_point(), "mha_ext: attn_bias must be floating (added to the scores), got ",
                     b.scalar_type(), "; pass boolean masks as attn_mask");
    p.bias_type = additive_type(b, "attn_bias");
    bind_mask(b, "attn_bias", p.bias);
  }
  return prep;
}

void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "mha_ext: dropout_p must be in [0, 1], got ", dropout_p);
}

DropoutRule dropout_rule(double dropout_p, const std::optional<at::Tensor>& rng_state, const PreparedAttention& prep) {
  check_dropout_p(dropout_p);
  if (dropout_p == 0.0) return DropoutRule{};
  TORCH_CHECK_VALUE(rng_state.has_value() && rng_state->defined(), "mha_ext: dropout_p = ", dropout_p,
                    " needs rng_state, an int64 tensor [seed, offset]; got none");
  const int64_t count = rng_state->numel();
  TORCH_CHECK_VALUE(rng_state->scalar_type() == at::kLong && rng_state->dim() == 1 && (count == 2 || count == 6),
                    "mha_ext: rng_state must be an int64 tensor [seed, offset] or [seed, offset, row_offset, "
                    "column_offset, head_offset, total_heads], got ", rng_state->scalar_type(), " of shape ",
                    shape_str(rng_state->sizes()));
  const at::Tensor state = rng_state->to(at::kCPU).contiguous();  // a few numbers, read on the host
  const int64_t* values = state.data_ptr<int64_t>();
  DropoutRule rule = make_dropout_rule(dropout_p, static_cast<uint64_t>(values[0]), static_cast<uint64_t>(values[1]));
  if (count == 6) {
    const int64_t heads = prep.lead.has_heads ? prep.lead.sizes.back() : 1;
    TORCH_CHECK_VALUE(values[2] >= 0 && values[3] >= 0, "mha_ext: rng_state's row_offset and column_offset must be "
                      ">= 0, got ", values[2], " and ", values[3]);
    TORCH_CHECK_VALUE(values[4] >= 0 && values[4] + heads <= values[5], "mha_ext: rng_state's head_offset + the ",
                      heads, " query heads must be at most total_heads, got head_offset ", values[4],
                      " and total_heads ", values[5]);
    rule.row_offset = values[2];
    rule.column_offset = values[3];
    rule.heads = heads;
    rule.head_offset = values[4];
    rule.total_heads = values[5];
  }
  return rule;
}

Operand output_like_operand(const PreparedAttention& prep, const at::Tensor& tensor, const char* name,
                            at::Tensor& keep_alive) {
  TORCH_CHECK_VALUE(tensor.sizes() == at::IntArrayRef(prep.out_shape), "mha_ext: ", name, " must have shape ",
                    shape_str(prep.out_shape), ", got ", shape_str(tensor.sizes()));
  TORCH_CHECK_TYPE(tensor.scalar_type() == prep.query.scalar_type(), "mha_ext: ", name, " must have the query's dtype ",
                   prep.query.scalar_type(), ", got ", tensor.scalar_type());
  check_same_device(prep.query, tensor, name);
  keep_alive = prep.empty_v_dim ? zero_column(tensor, prep.params.L) : with_unit_last_stride(tensor);
  return GridBinder(prep.lead).bind(keep_alive, false);
}

Operand scores_operand(const PreparedAttention& prep, const at::Tensor& tensor) {
  return GridBinder(prep.lead).bind(tensor, true);
}

}  // namespace mha_ext
