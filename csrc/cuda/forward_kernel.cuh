// Fused attention forward: each work item is one (batch-head, query tile). It streams the key/value
// tiles through an online softmax held in shared memory, so extra memory is O(tile), never O(L x S).
// Mirrors csrc/cpu/forward.cpp; the softmax's rules are attention/online_softmax.h's.
#pragma once

#include <algorithm>

#include "attention/online_softmax.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ AttentionParams p) {
  using acc_t = typename Traits::acc_t;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const int ld_qk = padded(E), ld_v = padded(Ev), ld_s = padded(kBlockK);
  const auto layout = Traits::layout(E, Ev);
  extern __shared__ __align__(128) unsigned char shared_memory[];
  acc_t* smem = reinterpret_cast<acc_t*>(shared_memory);
  acc_t* q_tile = smem + layout.q;
  acc_t* k_tile = smem + layout.k;
  acc_t* v_tile = smem + layout.v;
  acc_t* out_acc = smem + layout.out;
  acc_t* scores = smem + layout.scores;
  acc_t* row_max = smem + layout.row_max;
  acc_t* row_sum = smem + layout.row_sum;
  acc_t* rescale = smem + layout.rescale;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    __syncthreads();  // the previous item is done with shared memory
    load_rows(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
    zero_rows(out_acc, ld_v, kBlockQ, Ev);
    for (int i = threadIdx.x; i < kBlockQ; i += kThreads) {
      row_max[i] = neg_inf<acc_t>();
      row_sum[i] = acc_t(0);
    }

    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      load_rows(k_tile, ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
      load_rows(v_tile, ld_v, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
      __syncthreads();

      // Scores; padding rows and columns are -inf, so they add nothing below.
      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        acc_t s = neg_inf<acc_t>();
        if (i < rows && j < cols) s = head.score(q0 + i, k0 + j, dot(q_tile + i * ld_qk, k_tile + j * ld_qk, E));
        scores[i * ld_s + j] = s;
      }
      __syncthreads();

      // Online softmax, one warp per row: scores become exp(s - new max); the row's running sum and
      // the factor that rescales its earlier output are updated.
      for (int i = warp; i < kBlockQ; i += kWarps) {
        acc_t* s_row = scores + i * ld_s;
        acc_t tile_max = neg_inf<acc_t>();
        for (int j = lane; j < kBlockK; j += kWarpSize) tile_max = max_acc(tile_max, s_row[j]);
        const SoftmaxUpdate<acc_t> update = online_softmax_update(row_max[i], warp_max(tile_max));
        acc_t tile_sum = 0;
        for (int j = lane; j < kBlockK; j += kWarpSize) {
          const acc_t e = exp_acc(s_row[j] - update.shift);
          tile_sum += e;  // the normaliser sums the probabilities before dropout
          s_row[j] = e * dropout_factor<acc_t>(p.dropout, n, q0 + i, k0 + j);
        }
        tile_sum = warp_sum(tile_sum);
        __syncwarp();  // every lane has read row_max[i] before lane 0 overwrites it
        if (lane == 0) {
          row_max[i] = update.max;
          row_sum[i] = row_sum[i] * update.rescale + tile_sum;
          rescale[i] = update.rescale;
        }
      }
      __syncthreads();

      // out = out * rescale + P V
      for (int idx = threadIdx.x; idx < kBlockQ * Ev; idx += kThreads) {
        const int i = idx / Ev, e = idx % Ev;
        const acc_t* p_row = scores + i * ld_s;
        acc_t acc = out_acc[i * ld_v + e] * rescale[i];
        for (int j = 0; j < cols; ++j) acc += p_row[j] * v_tile[j * ld_v + e];
        out_acc[i * ld_v + e] = acc;
      }
      __syncthreads();  // before the next tile overwrites K, V and the scores
    });
    __syncthreads();  // out_acc and the row state are complete (also when every tile was skipped)

    scalar_t* out = static_cast<scalar_t*>(p.out) + (n * p.L + q0) * p.Ev;
    for (int idx = threadIdx.x; idx < rows * Ev; idx += kThreads) {
      const int i = idx / Ev, e = idx % Ev;
      out[int64_t(i) * Ev + e] = static_cast<scalar_t>(out_acc[i * ld_v + e] * output_scale(row_sum[i]));
    }
    acc_t* lse = static_cast<acc_t*>(p.lse) + n * p.L + q0;
    for (int i = threadIdx.x; i < rows; i += kThreads)
      lse[i] = row_lse(row_max[i], row_sum[i]);
  }
}

template <typename scalar_t>
void run_forward(const AttentionParams& p) {
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  MHA_HEADDIM_SWITCH(std::max(E, Ev), kHeadDim, [&] {
    using Traits = TileTraits<scalar_t, kHeadDim, ForwardSmem>;
    launch_kernel(forward_kernel<scalar_t, Traits>, query_tile_items<Traits::kBlockQ>(p),
                  Traits::smem_bytes(E, Ev), p);
  });
}

}  // namespace mha_ext::cuda
