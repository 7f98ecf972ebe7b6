// The dropout decisions of a call, materialised (for tests and debugging): the same per-pair rule the
// forward and backward kernels apply on the fly.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention/entry.h"
#include "cpu/dropout.h"

namespace mha_ext::cpu {
namespace {

void dropout_mask_cpu(const AttentionParams& p, bool* keep) {
  const int64_t L = p.L, S = p.S;
  at::parallel_for(0, p.grid.numel * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bool* row = keep + r * S;
      for_each_dropout_decision(p.dropout, r / L, r % L, 0, S, [&](int64_t j, bool kept) { row[j] = kept; });
    }
  });
}

}  // namespace
}  // namespace mha_ext::cpu

TORCH_LIBRARY_IMPL(mha_ext, CPU, m) {
  m.impl("attention_dropout_mask",
         [](const at::Tensor& q, const at::Tensor& k, double dropout_p, const at::Tensor& rng_state) {
           return mha_ext::attention_dropout_mask(q, k, dropout_p, rng_state, mha_ext::cpu::dropout_mask_cpu);
         });
}
