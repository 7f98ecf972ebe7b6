// The dropout decisions of a call, materialised (for tests and debugging): the same per-pair rule the
// forward and backward kernels apply on the fly.
#include <ATen/Parallel.h>

#include "cpu/dropout.h"
#include "cpu/kernels.h"

namespace mha_ext::cpu {

void dropout_mask_cpu(const AttentionParams& p, bool* keep) {
  const int64_t L = p.L, S = p.S;
  at::parallel_for(0, p.grid.numel * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bool* row = keep + r * S;
      for_each_dropout_decision(p.dropout, r / L, r % L, 0, S, [&](int64_t j, bool kept) { row[j] = kept; });
    }
  });
}

}  // namespace mha_ext::cpu
