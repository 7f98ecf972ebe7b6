// Attention probabilities, recomputed tile by tile from the saved LSE (for callers that need the weights,
// e.g. nn.MultiheadAttention's need_weights=True). Mirrors csrc/cpu/weights.cpp: the output arrives
// zero-filled, and skipped tiles and rows that attended nothing stay 0.
#pragma once

#include <algorithm>

#include "attention/online_softmax.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads) weights_kernel(const __grid_constant__ AttentionParams p, scalar_t* weights) {
  using acc_t = typename Traits::acc_t;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const int E = static_cast<int>(p.E);
  const int ld_qk = padded(E);
  const auto layout = Traits::layout(E, static_cast<int>(p.Ev));
  extern __shared__ __align__(128) unsigned char shared_memory[];
  acc_t* smem = reinterpret_cast<acc_t*>(shared_memory);
  acc_t* q_tile = smem + layout.q;
  acc_t* k_tile = smem + layout.k;
  acc_t* lse = smem + layout.lse;
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    __syncthreads();  // the previous item is done with shared memory
    load_rows(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
    load_row_values(lse, lse_all + n * p.L + q0, rows, kBlockQ, neg_inf<acc_t>());

    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      load_rows(k_tile, ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
      __syncthreads();
      for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
        const int i = idx / cols, j = idx % cols;
        if (attended_nothing(lse[i])) continue;  // the row stays 0
        const acc_t s = head.score(q0 + i, k0 + j, dot(q_tile + i * ld_qk, k_tile + j * ld_qk, E));
        weights[(n * p.L + q0 + i) * p.S + k0 + j] = static_cast<scalar_t>(probability(s, lse[i]));
      }
      __syncthreads();  // before the next tile overwrites K
    });
  }
}

template <typename scalar_t>
void run_weights(const AttentionParams& p, void* weights) {
  const int E = static_cast<int>(p.E);
  MHA_HEADDIM_SWITCH(E, kHeadDim, [&] {
    using Traits = TileTraits<scalar_t, kHeadDim, WeightsSmem>;
    launch_kernel(weights_kernel<scalar_t, Traits>, query_tile_items<Traits::kBlockQ>(p),
                  Traits::smem_bytes(E, static_cast<int>(p.Ev)), p, static_cast<scalar_t*>(weights));
  });
}

}  // namespace mha_ext::cuda
