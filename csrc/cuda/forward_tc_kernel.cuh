// Fused attention forward on tensor cores for fp16/bf16 inputs on sm80 and newer: the work items, tile
// skipping, online softmax and results of forward_kernel.cuh, with the two products S = Q K^T and
// O += P V done by WMMA m16n16k16 (16-bit operands, fp32 accumulators). Fragments are opaque, so the
// per-row work (scale, masks, bias, softmax, dropout, rescaling the output) runs on the fp32 scores stored
// to shared memory, as in the CUDA-core kernel, and the probabilities go back to shared memory as 16-bit
// operands of P V. Each warp owns a 16-row strip of the query tile from its scores to its output rows, so
// within a key tile its steps need only __syncwarp; block-wide barriers guard the shared Q, K and V tiles.
#pragma once

#include <algorithm>

#include "attention/online_softmax.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/mma.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads) forward_tensor_core_kernel(const __grid_constant__ AttentionParams p) {
// bf16 WMMA needs sm80. A build for older targets gets an empty body, which the launcher never runs (it
// checks the architecture of the kernel's image first).
#if MHA_SM80_DEVICE_CODE
  namespace wmma = nvcuda::wmma;
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  constexpr int kColsPerLane = kBlockK / kWarpSize;
  static_assert(kBlockQ == kWarps * kMmaTile && kBlockK % kWarpSize == 0 && kBlockK % kMmaTile == 0);

  const auto [E, Ev, e_tiles, ev_tiles] = mma_head_dims(p);
  const auto layout = Traits::layout(E, Ev);
  const int ld_qk = layout.ld_qk, ld_v = layout.ld_v, ld_s = layout.ld_scores, ld_p = layout.ld_probs,
            ld_o = layout.ld_out;
  mma_t* q_tile = shared_region<mma_t>(layout.q);
  mma_t* k_tile = shared_region<mma_t>(layout.k);
  mma_t* v_tile = shared_region<mma_t>(layout.v);
  float* scores = shared_region<float>(layout.scores);
  mma_t* probs = shared_region<mma_t>(layout.probs);
  float* out_acc = shared_region<float>(layout.out);
  float* row_max = shared_region<float>(layout.row_max);
  float* row_sum = shared_region<float>(layout.row_sum);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int strip = warp * kMmaTile;  // the warp's first row in the query tile, its tile-row `warp`
  // Q and P are the A operands; K^T is read from K's rows (column-major), V from its rows (row-major).
  const TileView<mma_t, RowMajor> q_view{q_tile, ld_qk}, probs_view{probs, ld_p}, v_view{v_tile, ld_v};
  const TileView<mma_t, ColMajor> k_transposed{k_tile, ld_qk};

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    __syncthreads();  // the previous item is done with shared memory
    load_operand_tile(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
    zero_rows(out_acc, ld_o, kBlockQ, ev_tiles * kMmaTile);
    for (int i = threadIdx.x; i < kBlockQ; i += kThreads) {
      row_max[i] = neg_inf<float>();
      row_sum[i] = 0.f;
    }
    // A strip wholly past the last row has nothing to compute; its warp still joins every barrier.
    const bool strip_has_rows = strip < rows;

    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      // Keys [cols, kBlockK) and head-dim columns up to the next multiple of 16 are zero.
      load_operand_tile(k_tile, ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
      load_operand_tile(v_tile, ld_v, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
      __syncthreads();
      if (strip_has_rows) {
        const int key_steps = static_cast<int>(ceil_div(cols, kMmaTile));

        // Dot products of the strip's query rows with the tile's keys (columns past key_steps * 16 are not
        // computed, and not read below).
        for (int jt = 0; jt < key_steps; ++jt) {
          FragmentAcc dots;
          wmma::fill_fragment(dots, 0.f);
          mma_accumulate(dots, q_view, warp, k_transposed, jt, e_tiles);  // slices along the head dim
          wmma::store_matrix_sync(scores + strip * ld_s + jt * kMmaTile, dots, ld_s, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax row by row, as in forward_kernel.cuh: the probabilities exp(s - new max) that
        // dropout keeps go to `probs` as 16-bit operands (0 for dropped pairs and for padding rows and
        // columns); the row's running sum is updated and its output row rescaled in place. Dropout's
        // 1 / (1 - p) is applied to the output in fp32 at the end: fp16 cannot hold e / (1 - p) for p near 1.
        for (int r = 0; r < kMmaTile; ++r) {
          const int i = strip + r;
          float s[kColsPerLane];
          float tile_max = neg_inf<float>();
#pragma unroll
          for (int c = 0; c < kColsPerLane; ++c) {
            const int j = lane + c * kWarpSize;
            s[c] = i < rows && j < cols ? head.score(q0 + i, k0 + j, scores[i * ld_s + j]) : neg_inf<float>();
            tile_max = max_acc(tile_max, s[c]);
          }
          const SoftmaxUpdate<float> update = online_softmax_update(row_max[i], warp_max(tile_max));
          float tile_sum = 0.f;
#pragma unroll
          for (int c = 0; c < kColsPerLane; ++c) {
            const int j = lane + c * kWarpSize;
            const float prob = exp_acc(s[c] - update.shift);
            tile_sum += prob;  // the normaliser sums the probabilities before dropout
            const bool kept = dropout_factor<float>(p.dropout, n, q0 + i, k0 + j) != 0.f;
            probs[i * ld_p + j] = MmaOperand<scalar_t>::round(kept ? prob : 0.f);
          }
          tile_sum = warp_sum(tile_sum);
          for (int e = lane; e < ev_tiles * kMmaTile; e += kWarpSize) out_acc[i * ld_o + e] *= update.rescale;
          __syncwarp();  // every lane has read row_max[i] before lane 0 overwrites it
          if (lane == 0) {
            row_max[i] = update.max;
            row_sum[i] = row_sum[i] * update.rescale + tile_sum;
          }
        }
        __syncwarp();  // the probabilities and rescaled output rows are in place for the fragment loads

        // out strip += P V over the tile's keys; padding keys have P = 0 and V = 0.
        for (int t = 0; t < ev_tiles; ++t) {
          float* out_tile = out_acc + strip * ld_o + t * kMmaTile;
          FragmentAcc out_frag;
          wmma::load_matrix_sync(out_frag, out_tile, ld_o, wmma::mem_row_major);
          mma_accumulate(out_frag, probs_view, warp, v_view, t, key_steps);  // slices along the keys
          wmma::store_matrix_sync(out_tile, out_frag, ld_o, wmma::mem_row_major);
        }
      }
      __syncthreads();  // before the next tile overwrites K and V
    });
    __syncthreads();  // out_acc and the row state are complete (also when every tile was skipped)

    // keep_scale is 1 without dropout and 0 when it drops everything.
    const float keep_scale = static_cast<float>(p.dropout.keep_scale);
    scalar_t* out = static_cast<scalar_t*>(p.out) + (n * p.L + q0) * p.Ev;
    for (int idx = threadIdx.x; idx < rows * Ev; idx += kThreads) {
      const int i = idx / Ev, e = idx % Ev;
      out[int64_t(i) * Ev + e] = static_cast<scalar_t>(out_acc[i * ld_o + e] * keep_scale * output_scale(row_sum[i]));
    }
    float* lse = static_cast<float*>(p.lse) + n * p.L + q0;
    for (int i = threadIdx.x; i < rows; i += kThreads)
      lse[i] = row_lse(row_max[i], row_sum[i]);
  }
#endif
}

template <typename scalar_t>
void run_forward_tensor_cores(const AttentionParams& p) {
  MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    using Traits = ForwardTensorCoreTraits<kHeadDim>;
    launch_kernel(forward_tensor_core_kernel<scalar_t, Traits>, query_tile_items<Traits::kBlockQ>(p),
                  Traits::smem_bytes(static_cast<int>(p.E), static_cast<int>(p.Ev)), p);
  });
}

template <typename scalar_t>
std::string forward_tensor_cores_unavailable(const AttentionParams& p) {
  return MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    using Traits = ForwardTensorCoreTraits<kHeadDim>;
    return tensor_core_launch_unavailable(forward_tensor_core_kernel<scalar_t, Traits>,
                                          Traits::smem_bytes(static_cast<int>(p.E), static_cast<int>(p.Ev)));
  });
}

}  // namespace mha_ext::cuda
