#include "attention/contract.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

// Grid: query's leading dims with the head dim split into (kv_heads, group); size-1 dims dropped.
class GridBuilder {
 public:
  GridBuilder(at::IntArrayRef query_sizes, int64_t group) : has_heads_(query_sizes.size() >= 3), group_(group) {
    const int64_t n_lead = static_cast<int64_t>(query_sizes.size()) - 2;
    for (int64_t d = 0; d < n_lead; ++d) {
      if (has_heads_ && d == n_lead - 1) {
        sizes_.push_back(query_sizes[d] / group);
        sizes_.push_back(group);
      } else {
        sizes_.push_back(query_sizes[d]);
      }
    }
  }

  BatchGrid grid(at::IntArrayRef query_sizes) const {
    BatchGrid g;
    for (int64_t s : sizes_) {
      g.numel *= s;
      if (s == 1) continue;
      TORCH_CHECK_VALUE(g.ndim < kMaxGridDims, "mha_ext: query has too many batch dims of size > 1 (at most ",
                        kMaxGridDims - 2, " besides the head dim), got shape ", shape_str(query_sizes));
      g.sizes[g.ndim++] = s;
    }
    g.group = group_;
    return g;
  }

  // Binds a tensor whose leading dims lie over the query's; `is_kv` maps a query head to its kv head.
  Operand bind(const at::Tensor& t, bool is_kv) const {
    Operand op;
    const int64_t n_lead = t.dim() - 2;
    int out = 0;
    size_t grid_dim = 0;
    auto put = [&](int64_t stride) {
      if (sizes_[grid_dim++] != 1) op.grid_strides[out++] = stride;
    };
    for (int64_t d = 0; d < n_lead; ++d) {
      const int64_t stride = t.stride(d);
      if (has_heads_ && d == n_lead - 1) {
        put(is_kv ? stride : stride * group_);  // kv head
        put(is_kv ? 0 : stride);                // position within the group: K/V shared
      } else {
        put(stride);
      }
    }
    op.data = t.data_ptr();
    op.row_stride = t.stride(-2);
    op.col_stride = t.stride(-1);
    return op;
  }

 private:
  bool has_heads_;
  int64_t group_;
  std::vector<int64_t> sizes_;
};

}  // namespace

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

PreparedAttention prepare_attention(const at::Tensor& query_in, const at::Tensor& key_in,
                                    const at::Tensor& value_in, const std::optional<at::Tensor>& attn_mask,
                                    const std::optional<at::Tensor>& attn_bias, bool is_causal, double scale) {
  const int64_t rank = query_in.dim();
  TORCH_CHECK_VALUE(rank >= 2, "mha_ext: query must have at least 2 dims (..., L, E), got shape ",
                    shape_str(query_in.sizes()));
  TORCH_CHECK_VALUE(key_in.dim() == rank, "mha_ext: key must have the same number of dims as query (", rank,
                    "), got shape ", shape_str(key_in.sizes()));
  TORCH_CHECK_VALUE(value_in.dim() == rank, "mha_ext: value must have the same number of dims as query (",
                    rank, "), got shape ", shape_str(value_in.sizes()));
  TORCH_CHECK_TYPE(is_supported_dtype(query_in.scalar_type()),
                   "mha_ext: query must be float32, float64, bfloat16 or float16, got ", query_in.scalar_type());
  TORCH_CHECK_TYPE(key_in.scalar_type() == query_in.scalar_type(), "mha_ext: key must have the query's dtype ",
                   query_in.scalar_type(), ", got ", key_in.scalar_type());
  TORCH_CHECK_TYPE(value_in.scalar_type() == query_in.scalar_type(),
                   "mha_ext: value must have the query's dtype ", query_in.scalar_type(), ", got ",
                   value_in.scalar_type());
  check_same_device(query_in, key_in, "key");
  check_same_device(query_in, value_in, "value");

  const int64_t L = query_in.size(-2), E = query_in.size(-1);
  const int64_t S = key_in.size(-2), Ev = value_in.size(-1);
  TORCH_CHECK_VALUE(E >= 1, "mha_ext: query's head dim E (last dim) must be >= 1, got shape ",
                    shape_str(query_in.sizes()));
  TORCH_CHECK_VALUE(key_in.size(-1) == E, "mha_ext: key's last dim must equal query's head dim E = ", E,
                    ", got key shape ", shape_str(key_in.sizes()));
  TORCH_CHECK_VALUE(Ev >= 1, "mha_ext: value's head dim Ev (last dim) must be >= 1, got shape ",
                    shape_str(value_in.sizes()));
  TORCH_CHECK_VALUE(value_in.size(-2) == S, "mha_ext: value's sequence length (dim -2) must equal key's S = ",
                    S, ", got value shape ", shape_str(value_in.sizes()));

  const bool has_heads = rank >= 3;
  const int64_t Hq = has_heads ? query_in.size(-3) : 1;
  const int64_t Hkv = has_heads ? key_in.size(-3) : 1;
  if (has_heads) {
    TORCH_CHECK_VALUE(value_in.size(-3) == Hkv, "mha_ext: value must have key's number of heads (dim -3) ",
                      Hkv, ", got value shape ", shape_str(value_in.sizes()));
    TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "mha_ext: query heads (dim -3) must be a multiple of key/value ",
                      "heads; got query shape ", shape_str(query_in.sizes()), " and key shape ",
                      shape_str(key_in.sizes()));
    for (int64_t d = 0; d < rank - 3; ++d) {
      TORCH_CHECK_VALUE(key_in.size(d) == query_in.size(d) && value_in.size(d) == query_in.size(d),
                        "mha_ext: batch dim ", d, " must match across query, key and value; got query ",
                        shape_str(query_in.sizes()), ", key ", shape_str(key_in.sizes()), ", value ",
                        shape_str(value_in.sizes()));
    }
  }
  const int64_t group = Hq / Hkv;

  PreparedAttention prep;
  prep.query = with_unit_last_stride(query_in);
  prep.key = with_unit_last_stride(key_in);
  prep.value = with_unit_last_stride(value_in);

  // Leading dims of the query (everything before L, E); the head dim, if any, is last.
  const auto q_lead = query_in.sizes().slice(0, rank - 2);
  std::vector<int64_t> scores_shape(q_lead.begin(), q_lead.end());
  scores_shape.push_back(L);
  scores_shape.push_back(S);
  prep.scores_shape = scores_shape;
  prep.lse_shape.assign(q_lead.begin(), q_lead.end());
  prep.lse_shape.push_back(L);
  prep.out_shape = prep.lse_shape;
  prep.out_shape.push_back(Ev);

  const GridBuilder builder(query_in.sizes(), group);
  AttentionParams& p = prep.params;
  p.grid = builder.grid(query_in.sizes());
  p.L = L;
  p.S = S;
  p.E = E;
  p.Ev = Ev;
  p.scale = scale;
  p.is_causal = is_causal;
  auto bind = [&](const at::Tensor& t, bool is_kv, Operand& op) { op = builder.bind(t, is_kv); };
  bind(prep.query, false, p.query);
  bind(prep.key, true, p.key);
  bind(prep.value, true, p.value);

  // Masks are expanded (stride 0, no copy) to the scores' shape and bound like the query.
  auto bind_mask = [&](const at::Tensor& m, const char* name, Operand& op) {
    check_same_device(query_in, m, name);
    TORCH_CHECK_VALUE(m.dim() <= static_cast<int64_t>(scores_shape.size()), "mha_ext: ", name, " of shape ",
                      shape_str(m.sizes()), " is not broadcastable to the attention scores' shape ",
                      shape_str(scores_shape), ": it has more dims");
    const int64_t offset = static_cast<int64_t>(scores_shape.size()) - m.dim();
    for (int64_t d = 0; d < m.dim(); ++d) {
      TORCH_CHECK_VALUE(m.size(d) == 1 || m.size(d) == scores_shape[offset + d], "mha_ext: ", name,
                        " of shape ", shape_str(m.sizes()), " is not broadcastable to the attention scores' shape ",
                        shape_str(scores_shape), " (..., Hq, L, S): dim ", d, " is ", m.size(d), ", expected 1 or ",
                        scores_shape[offset + d]);
    }
    at::Tensor expanded = m.expand(scores_shape);
    prep.alive.push_back(expanded);
    bind(expanded, false, op);
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

DropoutRule dropout_rule(double dropout_p, const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "mha_ext: dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p == 0.0) return DropoutRule{};
  TORCH_CHECK_VALUE(rng_state.has_value() && rng_state->defined(), "mha_ext: dropout_p = ", dropout_p,
                    " needs rng_state, an int64 tensor [seed, offset]; got none");
  TORCH_CHECK_VALUE(rng_state->scalar_type() == at::kLong && rng_state->numel() == 2,
                    "mha_ext: rng_state must be an int64 tensor of 2 elements [seed, offset], got ",
                    rng_state->scalar_type(), " of shape ", shape_str(rng_state->sizes()));
  const at::Tensor state = rng_state->to(at::kCPU).contiguous();  // two numbers, read on the host
  const int64_t* values = state.data_ptr<int64_t>();
  return make_dropout_rule(dropout_p, static_cast<uint64_t>(values[0]), static_cast<uint64_t>(values[1]));
}

Operand query_like_operand(const PreparedAttention& prep, const at::Tensor& tensor, const char* name, int64_t cols,
                           at::Tensor& keep_alive) {
  std::vector<int64_t> expected(prep.lse_shape);
  expected.push_back(cols);
  TORCH_CHECK_VALUE(tensor.sizes() == at::IntArrayRef(expected), "mha_ext: ", name, " must have shape ",
                    shape_str(expected), ", got ", shape_str(tensor.sizes()));
  TORCH_CHECK_TYPE(tensor.scalar_type() == prep.query.scalar_type(), "mha_ext: ", name, " must have the query's dtype ",
                   prep.query.scalar_type(), ", got ", tensor.scalar_type());
  check_same_device(prep.query, tensor, name);
  keep_alive = with_unit_last_stride(tensor);
  return GridBuilder(prep.query.sizes(), prep.params.grid.group).bind(keep_alive, false);
}

Operand scores_operand(const PreparedAttention& prep, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(prep.scores_shape), "mha_ext internal error: scores operand of shape ",
              shape_str(tensor.sizes()), ", expected ", shape_str(prep.scores_shape));
  return GridBuilder(prep.query.sizes(), prep.params.grid.group).bind(tensor, false);
}

}  // namespace mha_ext
