#include "attention/varlen.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "attention/contract.h"
#include "attention/entry.h"
#include "attention/sequence_schedule.h"

namespace mha_ext {
namespace {

// The batch as the offsets describe it, read on the host (a device backend copies them over: one sync).
struct Sequences {
  std::vector<int64_t> q_start, k_start;  // count + 1 offsets each

  int64_t count() const { return static_cast<int64_t>(q_start.size()) - 1; }
  int64_t q_len(int64_t n) const { return q_start[n + 1] - q_start[n]; }
  int64_t k_len(int64_t n) const { return k_start[n + 1] - k_start[n]; }
};

void check_packed(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 3, "mha_ext: ", name, " must be packed as ", layout, " (3 dims), got shape ",
                    shape_str(t.sizes()));
}

std::vector<int64_t> read_offsets(const at::Tensor& cu_seqlens, const char* name, int64_t total, const char* of,
                                  int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, "mha_ext: ", name,
                   " must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "mha_ext: ", name,
                    " must be 1-D with batch + 1 offsets, got shape ", shape_str(cu_seqlens.sizes()));
  TORCH_CHECK_VALUE(max_seqlen >= 0, "mha_ext: ", max_name, " must be >= 0, got ", max_seqlen);
  const at::Tensor host = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t* values = host.data_ptr<int64_t>();
  std::vector<int64_t> offsets(values, values + host.numel());
  TORCH_CHECK_VALUE(offsets.front() == 0, "mha_ext: ", name, " must start at 0, got ", offsets.front());
  for (size_t n = 1; n < offsets.size(); ++n) {
    const int64_t length = offsets[n] - offsets[n - 1];
    TORCH_CHECK_VALUE(length >= 0, "mha_ext: ", name, " must be non-decreasing, got ", offsets[n - 1], " then ",
                      offsets[n], " at index ", n);
    TORCH_CHECK_VALUE(length <= max_seqlen, "mha_ext: sequence ", n - 1, " has ", length, " tokens (", name,
                      "), more than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(offsets.back() == total, "mha_ext: ", name, " must end at ", of, "'s total tokens (dim 0) ",
                    total, ", got ", offsets.back());
  return offsets;
}

// The output's heads: the query's, or key/value's where the query has one (the dense op's rule).
int64_t output_heads(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  return query.size(1) != 1 ? query.size(1) : std::max(key.size(1), value.size(1));
}

Sequences read_sequences(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k) {
  check_packed(query, "query", "(total_q, Hq, E)");
  check_packed(key, "key", "(total_k, Hkv, E)");
  check_packed(value, "value", "(total_k, Hkv, Ev)");
  TORCH_CHECK_VALUE(value.size(0) == key.size(0), "mha_ext: value's total tokens (dim 0) must equal key's ",
                    key.size(0), ", got ", value.size(0));
  Sequences s{read_offsets(cu_seqlens_q, "cu_seqlens_q", query.size(0), "query", max_seqlen_q, "max_seqlen_q"),
              read_offsets(cu_seqlens_k, "cu_seqlens_k", key.size(0), "key", max_seqlen_k, "max_seqlen_k")};
  TORCH_CHECK_VALUE(s.q_start.size() == s.k_start.size(), "mha_ext: cu_seqlens_q and cu_seqlens_k must hold the "
                    "same number of sequences, got ", s.count(), " and ", s.k_start.size() - 1);
  return s;
}

// A mask or bias in the padded layout, broadcastable to (batch, H, max_seqlen_q, max_seqlen_k).
void check_padded(const std::optional<at::Tensor>& t, const char* name, int64_t batch, int64_t max_q, int64_t max_k) {
  if (!t.has_value() || !t->defined()) return;
  const std::vector<int64_t> wanted{batch, -1, max_q, max_k};  // the heads are the dense op's to check
  TORCH_CHECK_VALUE(t->dim() >= 2 && t->dim() <= 4, "mha_ext: ", name, " must broadcast to (batch, H, max_seqlen_q, "
                    "max_seqlen_k) = (", batch, ", H, ", max_q, ", ", max_k, "), got shape ", shape_str(t->sizes()));
  for (int64_t d = 0; d < t->dim(); ++d) {
    const int64_t want = wanted[4 - t->dim() + d];
    TORCH_CHECK_VALUE(want < 0 || t->size(d) == 1 || t->size(d) == want, "mha_ext: ", name,
                      " must broadcast to (batch, H, max_seqlen_q, max_seqlen_k) = (", batch, ", H, ", max_q, ", ",
                      max_k, "), got shape ", shape_str(t->sizes()));
  }
}

// Sequence n's part of a padded-layout mask, bias or gradient: [n, :, :L, :S] (a view; size-1 dims kept).
at::Tensor sequence_part(const at::Tensor& padded, int64_t n, int64_t L, int64_t S) {
  at::Tensor t = padded;
  while (t.dim() < 4) t = t.unsqueeze(0);
  t = t.select(0, t.size(0) == 1 ? 0 : n);
  if (t.size(1) != 1) t = t.narrow(1, 0, L);
  if (t.size(2) != 1) t = t.narrow(2, 0, S);
  return t;
}

std::optional<at::Tensor> sequence_part(const std::optional<at::Tensor>& padded, int64_t n, int64_t L, int64_t S) {
  if (!padded.has_value() || !padded->defined()) return std::nullopt;
  return sequence_part(*padded, n, L, S);
}

// rng_state [seed, offset] for the whole packed call; each sequence decides as a slice of it (philox.h), at its
// packed rows and columns, so a sequence's decisions do not depend on the others.
void check_rng_state(double dropout_p, const std::optional<at::Tensor>& rng_state) {
  check_dropout_p(dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(rng_state.has_value() && rng_state->defined() && rng_state->scalar_type() == at::kLong &&
                        rng_state->dim() == 1 && rng_state->numel() == 2,
                    "mha_ext: dropout_p = ", dropout_p, " needs rng_state, an int64 tensor [seed, offset], got ",
                    rng_state.has_value() && rng_state->defined()
                        ? std::string(c10::toString(rng_state->scalar_type())) + " of shape " + shape_str(rng_state->sizes())
                        : std::string("none"));
}

std::optional<at::Tensor> sequence_rng_state(double dropout_p, const std::optional<at::Tensor>& rng_state,
                                             int64_t q_start, int64_t k_start, int64_t heads) {
  if (dropout_p == 0.0) return std::nullopt;
  const at::Tensor state = rng_state->to(at::kCPU).contiguous();
  const int64_t* seed_offset = state.data_ptr<int64_t>();
  at::Tensor slice = at::empty({6}, at::kLong);
  int64_t* v = slice.data_ptr<int64_t>();
  v[0] = seed_offset[0];
  v[1] = seed_offset[1];
  v[2] = q_start;
  v[3] = k_start;
  v[4] = 0;
  v[5] = heads;
  return slice;
}

// Validates a packed call's arguments (those the dense op does not see whole) and reads its sequences.
Sequences prepare_packed_call(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& attn_bias, double dropout_p,
                              const std::optional<at::Tensor>& rng_state) {
  Sequences s = read_sequences(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_padded(attn_mask, "attn_mask", s.count(), max_seqlen_q, max_seqlen_k);
  check_padded(attn_bias, "attn_bias", s.count(), max_seqlen_q, max_seqlen_k);
  check_rng_state(dropout_p, rng_state);
  return s;
}

// Per sequence, the pairs it computes (and one per row, so that rows without keys count).
std::vector<int64_t> sequence_work(const Sequences& s) {
  std::vector<int64_t> work(s.count());
  for (int64_t n = 0; n < s.count(); ++n) work[n] = s.q_len(n) * (s.k_len(n) + 1);
  return work;
}

// Packed rows of sequence n as the dense op's (H, L, D) operand: a strided view, read in place.
at::Tensor heads_first(const at::Tensor& packed, int64_t start, int64_t length) {
  return packed.narrow(0, start, length).transpose(0, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const Backend& backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  const Sequences s = prepare_packed_call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          attn_mask, attn_bias, dropout_p, rng_state);
  const int64_t heads = output_heads(query, key, value);
  at::Tensor out = at::empty({query.size(0), heads, value.size(2)}, query.options());
  at::Tensor lse = at::empty({heads, query.size(0)}, query.options().dtype(accumulation_dtype(query.scalar_type())));
  for_each_sequence(sequence_work(s), query.device().is_cpu(), [&](int64_t n) {
    const int64_t q0 = s.q_start[n], k0 = s.k_start[n], L = s.q_len(n), S = s.k_len(n);
    if (L == 0) return;
    auto [seq_out, seq_lse] = attention_forward(
        backend, heads_first(query, q0, L), heads_first(key, k0, S), heads_first(value, k0, S),
        sequence_part(attn_mask, n, L, S), sequence_part(attn_bias, n, L, S), causal, scale, dropout_p,
        sequence_rng_state(dropout_p, rng_state, q0, k0, heads));
    heads_first(out, q0, L).copy_(seq_out);
    lse.narrow(1, q0, L).copy_(seq_lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool mask_requires_grad, bool bias_requires_grad,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, c10::string_view causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  const Sequences s = prepare_packed_call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          attn_mask, attn_bias, dropout_p, rng_state);
  const int64_t heads = output_heads(query, key, value);
  const std::vector<int64_t> out_shape{query.size(0), heads, value.size(2)}, lse_shape{heads, query.size(0)};
  for (const auto& [t, name, shape] : {std::tuple{&grad_output, "grad_output", &out_shape},
                                       {&output, "output", &out_shape}, {&lse, "lse", &lse_shape}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(*shape), "mha_ext: ", name, " must have shape ",
                      shape_str(*shape), ", got ", shape_str(t->sizes()));
  }
  const bool has_grad_lse = grad_lse.has_value() && grad_lse->defined();
  TORCH_CHECK_VALUE(!has_grad_lse || grad_lse->sizes() == at::IntArrayRef(lse_shape), "mha_ext: grad_lse must have "
                    "shape ", shape_str(lse_shape), ", got ", shape_str(grad_lse->sizes()));

  at::Tensor grad_query = at::zeros(query.sizes(), query.options());
  at::Tensor grad_key = at::zeros(key.sizes(), key.options());  // keys of sequences without queries get none
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  // Per-sequence mask / bias gradients, added into a shared mask's gradient in sequence order afterwards.
  std::vector<at::Tensor> mask_parts(s.count()), bias_parts(s.count());
  for_each_sequence(sequence_work(s), query.device().is_cpu(), [&](int64_t n) {
    const int64_t q0 = s.q_start[n], k0 = s.k_start[n], L = s.q_len(n), S = s.k_len(n);
    if (L == 0) return;
    const std::optional<at::Tensor> seq_grad_lse =
        has_grad_lse ? std::optional<at::Tensor>(grad_lse->narrow(1, q0, L)) : std::nullopt;
    auto [gq, gk, gv, gm, gb] = attention_backward(
        backend, heads_first(grad_output, q0, L), heads_first(output, q0, L), lse.narrow(1, q0, L), seq_grad_lse,
        mask_requires_grad, bias_requires_grad, heads_first(query, q0, L), heads_first(key, k0, S),
        heads_first(value, k0, S), sequence_part(attn_mask, n, L, S), sequence_part(attn_bias, n, L, S), causal,
        scale, dropout_p, sequence_rng_state(dropout_p, rng_state, q0, k0, heads));
    heads_first(grad_query, q0, L).copy_(gq);
    heads_first(grad_key, k0, S).copy_(gk);
    heads_first(grad_value, k0, S).copy_(gv);
    mask_parts[n] = gm;
    bias_parts[n] = gb;
  });
  auto gather = [&](const std::optional<at::Tensor>& padded, const std::vector<at::Tensor>& parts, bool wanted,
                    const char* name) {
    if (!wanted) return at::empty({0}, query.options());
    TORCH_CHECK_VALUE(padded.has_value() && padded->defined() && padded->is_floating_point(), "mha_ext: a gradient "
                      "for ", name, " was requested, but ", name, " is not a floating tensor");
    at::Tensor grad = at::zeros(padded->sizes(), padded->options().dtype(accumulation_dtype(padded->scalar_type())));
    for (int64_t n = 0; n < s.count(); ++n) {
      if (parts[n].defined()) sequence_part(grad, n, s.q_len(n), s.k_len(n)).add_(parts[n]);
    }
    return grad.to(padded->scalar_type());
  };
  return {grad_query, grad_key, grad_value, gather(attn_mask, mask_parts, mask_requires_grad, "attn_mask"),
          gather(attn_bias, bias_parts, bias_requires_grad, "attn_bias")};
}

}  // namespace mha_ext
