// Where one (batch, query head) pair's operands start, and its masked scores: what every backend's kernels
// read first.
#pragma once

#include "attention/masking.h"
#include "attention/params.h"

namespace mha_ext {

template <typename scalar_t>
struct HeadPointers {
  const AttentionParams& p;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const bool* bool_mask;  // null without a bool mask
  const void* mask_add;   // null without a floating attn_mask; scalar_t or float per p.mask_add_type
  const void* bias;       // null without attn_bias; scalar_t or float per p.bias_type

  MHA_HOST_DEVICE HeadPointers(const AttentionParams& params, int64_t n)
      : p(params),
        q(params.query.ptr<scalar_t>(params.grid, n)),
        k(params.key.ptr<scalar_t>(params.grid, n)),
        v(params.value.ptr<scalar_t>(params.grid, n)),
        bool_mask(params.has_bool_mask ? params.bool_mask.ptr<bool>(params.grid, n) : nullptr),
        mask_add(additive_ptr(params.mask_add_type, params.mask_add, params.grid, n)),
        bias(additive_ptr(params.bias_type, params.bias, params.grid, n)) {}

  // The score of query row i and key row j (both in bounds) given dot = q_i . k_j (masking.h's rule).
  template <typename acc_t>
  MHA_HOST_DEVICE acc_t masked_score(int64_t i, int64_t j, acc_t dot) const {
    if (!bool_mask_allows(bool_mask, p.bool_mask, i, j) || p.causal.excludes(i, j)) return neg_inf<acc_t>();
    return static_cast<acc_t>(p.scale) * dot + additive_at<scalar_t, acc_t>(p.mask_add_type, mask_add, p.mask_add, i, j) +
           additive_at<scalar_t, acc_t>(p.bias_type, bias, p.bias, i, j);
  }

 private:
  MHA_HOST_DEVICE static const void* additive_ptr(AdditiveType type, const Operand& op, const BatchGrid& grid,
                                                  int64_t n) {
    switch (type) {
      case AdditiveType::kSameAsQuery:
        return op.ptr<scalar_t>(grid, n);
      case AdditiveType::kFloat32:
        return op.ptr<float>(grid, n);
      default:
        return nullptr;
    }
  }
};

}  // namespace mha_ext
