// The masking rule, written once for every kernel: a score is scale * q.k plus the floating masks (a
// floating attn_mask and attn_bias, each the query's dtype or float32), or -inf where the bool mask
// (True = attend) or causality (causal.h) leaves the pair out. The element functions here are the rule;
// the CPU kernels apply it a row at a time with vector code, the CUDA kernels an element at a time.
#pragma once

#include <cstdint>

#include "attention/numerics.h"
#include "attention/params.h"

namespace mha_ext {

// Entry (i, j) of an additive operand whose batch-head slab starts at `slab`, in the accumulation type;
// 0 where there is none.
template <typename scalar_t, typename acc_t>
MHA_HOST_DEVICE acc_t additive_at(AdditiveType type, const void* slab, const Operand& op, int64_t i, int64_t j) {
  switch (type) {
    case AdditiveType::kSameAsQuery:
      return static_cast<acc_t>(static_cast<const scalar_t*>(slab)[op.element(i, j)]);
    case AdditiveType::kFloat32:
      return static_cast<acc_t>(static_cast<const float*>(slab)[op.element(i, j)]);
    default:
      return acc_t(0);
  }
}

// Whether the bool mask (its batch-head slab at `slab`; null: no bool mask) lets query i attend key j.
MHA_HOST_DEVICE inline bool bool_mask_allows(const bool* slab, const Operand& op, int64_t i, int64_t j) {
  return slab == nullptr || slab[op.element(i, j)];
}

}  // namespace mha_ext
