// The dropout decisions of a call, materialised (for tests and debugging): the same per-pair rule the
// forward and backward kernels apply, so the same seed and offset give the same mask as on the CPU.
#include "cuda/launch.h"
#include "cuda/launch_kernel.cuh"

namespace mha_ext::cuda {
namespace {

// One block per (batch-head, query row); threads stride over the keys.
__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(const __grid_constant__ AttentionParams p, bool* keep) {
  for (int64_t r = blockIdx.x; r < p.grid.numel * p.L; r += gridDim.x) {
    const int64_t n = r / p.L, row = r % p.L;
    for (int64_t col = threadIdx.x; col < p.S; col += kThreads)
      keep[r * p.S + col] = dropout_factor<float>(p.dropout, n, row, col) != 0.f;
  }
}

}  // namespace

void run_dropout_mask(const AttentionParams& p, bool* keep) {
  launch_kernel(dropout_mask_kernel, p.grid.numel * p.L, 0, p, keep);
}

}  // namespace mha_ext::cuda
