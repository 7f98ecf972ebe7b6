// Fused attention backward on tensor cores for fp16/bf16 inputs on sm80 and newer: the three kernels of
// backward_kernel.cuh (delta; dK/dV per owned key tile; dQ and the score gradient per owned query tile),
// with every product on WMMA: S = Q K^T and dP = dO V^T into fp32 tiles, then P and dS from them in fp32 by
// prob_and_grad_from_dots, rounded to 16-bit operands for dV += P^T dO, dK += dS^T Q and dQ += dS K,
// which accumulate in fp32 in shared memory. The score gradient the mask/bias gradients need is written
// from the fp32 dS. Each accumulator tile is written by one warp in a fixed order: bitwise reproducible.
#pragma once

#include <algorithm>

#include "cuda/backward_kernel.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/mma.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads)
    key_grad_tensor_core_kernel(const __grid_constant__ AttentionGradParams g, const float* delta_all) {
// An empty body below sm80, which the launcher never runs (see forward_tc_kernel.cuh).
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionParams& p = g.fwd;
  const auto [E, Ev, e_tiles, ev_tiles] = mma_head_dims(p);
  const auto layout = Traits::layout(E, Ev);
  const int ld_qk = layout.ld_qk, ld_v = layout.ld_v, ld_s = layout.ld_scores, ld_p = layout.ld_probs,
            ld_gk = layout.ld_grad_qk, ld_gv = layout.ld_grad_v;
  mma_t* k_tile = shared_region<mma_t>(layout.k);
  mma_t* v_tile = shared_region<mma_t>(layout.v);
  float* grad_k = shared_region<float>(layout.grad_k);
  float* grad_v = shared_region<float>(layout.grad_v);
  mma_t* q_tile = shared_region<mma_t>(layout.q);
  mma_t* grad_out_tile = shared_region<mma_t>(layout.grad_out);
  float* scores = shared_region<float>(layout.scores);
  float* grad_probs = shared_region<float>(layout.grad_probs);
  mma_t* probs = shared_region<mma_t>(layout.probs);
  mma_t* grad_scores = shared_region<mma_t>(layout.grad_scores);
  float* lse = shared_region<float>(layout.lse);
  float* delta = shared_region<float>(layout.delta);
  // Q and dO are row-major operands; K^T and V^T are read from their rows, P^T and dS^T from theirs.
  const TileView<mma_t, RowMajor> q_view{q_tile, ld_qk}, grad_out_view{grad_out_tile, ld_v};
  const TileView<mma_t, ColMajor> k_transposed{k_tile, ld_qk}, v_transposed{v_tile, ld_v};
  const TileView<mma_t, ColMajor> probs_transposed{probs, ld_p}, grad_scores_transposed{grad_scores, ld_p};
  const float scale = static_cast<float>(p.scale);
  const float* lse_all = static_cast<const float*>(p.lse);

  const int64_t G = p.grid.group;
  for (int64_t item = blockIdx.x; item < key_tile_items<kBlockK>(p); item += gridDim.x) {
    const auto [m, k0, cols] = key_tile<kBlockK>(p, item);
    const int key_tiles = static_cast<int>(ceil_div(cols, kMmaTile));
    const HeadView<scalar_t> kv_head(p, m * G);
    __syncthreads();  // the previous item is done with shared memory
    // Keys [cols, kBlockK) and head-dim columns up to the next multiple of 16 are zero.
    load_operand_tile(k_tile, ld_qk, kv_head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
    load_operand_tile(v_tile, ld_v, kv_head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
    zero_rows(grad_k, ld_gk, kBlockK, e_tiles * kMmaTile);
    zero_rows(grad_v, ld_gv, kBlockK, ev_tiles * kMmaTile);

    for_each_query_tile<kBlockQ, scalar_t>(p, m, k0, cols, [&](int64_t n, const HeadView<scalar_t>& head,
                                                              int64_t q0, int rows) {
      const scalar_t* grad_out = g.grad_out.ptr<scalar_t>(p.grid, n);
      const int query_tiles = static_cast<int>(ceil_div(rows, kMmaTile));
      load_operand_tile(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
      load_operand_tile(grad_out_tile, ld_v, grad_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride, rows, kBlockQ, Ev);
      load_row_values(lse, lse_all + n * p.L + q0, rows, kBlockQ, neg_inf<float>());
      load_row_values(delta, delta_all + n * p.L + q0, rows, kBlockQ, 0.f);
      __syncthreads();

      block_mma(scores, ld_s, false, q_view, k_transposed, query_tiles, key_tiles, e_tiles);
      block_mma(grad_probs, ld_s, false, grad_out_view, v_transposed, query_tiles, key_tiles, ev_tiles);
      __syncthreads();

      // P and dS as 16-bit operands, 0 for padding rows and columns.
      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        ProbAndGrad<float> pg{0.f, 0.f};
        if (i < rows && j < cols) {
          pg = prob_and_grad_from_dots(head, n, q0 + i, k0 + j, scores[i * ld_s + j], grad_probs[i * ld_s + j],
                                       lse[i], delta[i]);
        }
        probs[i * ld_p + j] = MmaOperand<scalar_t>::round(pg.prob);
        grad_scores[i * ld_p + j] = MmaOperand<scalar_t>::round(pg.grad_score);
      }
      __syncthreads();

      // dV += P^T dO;  dK += dS^T Q (scaled once, at the end), over the tile's query rows.
      block_mma(grad_v, ld_gv, true, probs_transposed, grad_out_view, key_tiles, ev_tiles, query_tiles);
      block_mma(grad_k, ld_gk, true, grad_scores_transposed, q_view, key_tiles, e_tiles, query_tiles);
      __syncthreads();  // before the next query tile overwrites Q, dO, S, dP, P and dS
    });
    __syncthreads();  // the accumulators are complete (also when every tile was skipped)

    scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * p.S + k0) * p.E;
    scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * p.S + k0) * p.Ev;
    for (int idx = threadIdx.x; idx < cols * E; idx += kThreads)
      grad_key[idx] = static_cast<scalar_t>(scale * grad_k[(idx / E) * ld_gk + idx % E]);
    for (int idx = threadIdx.x; idx < cols * Ev; idx += kThreads)
      grad_value[idx] = static_cast<scalar_t>(grad_v[(idx / Ev) * ld_gv + idx % Ev]);
  }
#endif
}

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads)
    query_grad_tensor_core_kernel(const __grid_constant__ AttentionGradParams g, const float* delta_all) {
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionParams& p = g.fwd;
  const auto [E, Ev, e_tiles, ev_tiles] = mma_head_dims(p);
  const auto layout = Traits::layout(E, Ev);
  const int ld_qk = layout.ld_qk, ld_v = layout.ld_v, ld_s = layout.ld_scores, ld_p = layout.ld_probs,
            ld_gq = layout.ld_grad_qk;
  mma_t* q_tile = shared_region<mma_t>(layout.q);
  mma_t* grad_out_tile = shared_region<mma_t>(layout.grad_out);
  float* grad_q = shared_region<float>(layout.grad_q);
  mma_t* k_tile = shared_region<mma_t>(layout.k);
  mma_t* v_tile = shared_region<mma_t>(layout.v);
  float* scores = shared_region<float>(layout.scores);
  float* grad_probs = shared_region<float>(layout.grad_probs);
  mma_t* grad_scores = shared_region<mma_t>(layout.grad_scores);
  float* lse = shared_region<float>(layout.lse);
  float* delta = shared_region<float>(layout.delta);
  const TileView<mma_t, RowMajor> q_view{q_tile, ld_qk}, grad_out_view{grad_out_tile, ld_v};
  const TileView<mma_t, RowMajor> grad_scores_view{grad_scores, ld_p}, k_view{k_tile, ld_qk};
  const TileView<mma_t, ColMajor> k_transposed{k_tile, ld_qk}, v_transposed{v_tile, ld_v};
  const float scale = static_cast<float>(p.scale);
  const float* lse_all = static_cast<const float*>(p.lse);

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const int query_tiles = static_cast<int>(ceil_div(rows, kMmaTile));
    const HeadView<scalar_t> head(p, n);
    const scalar_t* grad_out = g.grad_out.ptr<scalar_t>(p.grid, n);
    // One slab per batch-head here (GradScoresLayout::kPerBatchHead): blocks never write the same element.
    float* grad_scores_slab = g.grad_scores.data != nullptr ? g.grad_scores_slab<float>(n) : nullptr;
    __syncthreads();  // the previous item is done with shared memory
    load_operand_tile(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
    load_operand_tile(grad_out_tile, ld_v, grad_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride, rows, kBlockQ, Ev);
    zero_rows(grad_q, ld_gq, kBlockQ, e_tiles * kMmaTile);
    load_row_values(lse, lse_all + n * p.L + q0, rows, kBlockQ, neg_inf<float>());
    load_row_values(delta, delta_all + n * p.L + q0, rows, kBlockQ, 0.f);

    // Tiles it skips leave dS at 0 (zero-filled).
    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      const int key_tiles = static_cast<int>(ceil_div(cols, kMmaTile));
      load_operand_tile(k_tile, ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
      load_operand_tile(v_tile, ld_v, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
      __syncthreads();

      block_mma(scores, ld_s, false, q_view, k_transposed, query_tiles, key_tiles, e_tiles);
      block_mma(grad_probs, ld_s, false, grad_out_view, v_transposed, query_tiles, key_tiles, ev_tiles);
      __syncthreads();

      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        float ds = 0.f;
        if (i < rows && j < cols) {
          ds = prob_and_grad_from_dots(head, n, q0 + i, k0 + j, scores[i * ld_s + j], grad_probs[i * ld_s + j],
                                       lse[i], delta[i])
                   .grad_score;
          if (grad_scores_slab != nullptr) grad_scores_slab[(q0 + i) * p.S + k0 + j] = ds;
        }
        grad_scores[i * ld_p + j] = MmaOperand<scalar_t>::round(ds);
      }
      __syncthreads();

      // dQ += dS K (scaled once, at the end)
      block_mma(grad_q, ld_gq, true, grad_scores_view, k_view, query_tiles, e_tiles, key_tiles);
      __syncthreads();  // before the next key tile overwrites K, V, S, dP and dS
    });
    __syncthreads();  // the accumulator is complete (also when every tile was skipped)

    float* grad_query = static_cast<float*>(g.grad_query) + (n * p.L + q0) * p.E;
    for (int idx = threadIdx.x; idx < rows * E; idx += kThreads)
      grad_query[idx] = scale * grad_q[(idx / E) * ld_gq + idx % E];
  }
#endif
}

template <typename scalar_t, int kHeadDim>
bool launch_backward_tensor_cores(const AttentionGradParams& g) {
  using KeyTraits = BackwardTensorCoreTraits<KeyGradTensorCoreSmem, kHeadDim>;
  using QueryTraits = BackwardTensorCoreTraits<QueryGradTensorCoreSmem, kHeadDim>;
  const auto key_kernel = key_grad_tensor_core_kernel<scalar_t, KeyTraits>;
  const auto query_kernel = query_grad_tensor_core_kernel<scalar_t, QueryTraits>;
  const AttentionParams& p = g.fwd;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const size_t key_smem = KeyTraits::smem_bytes(E, Ev), query_smem = QueryTraits::smem_bytes(E, Ev);
  if (!has_sm80_image(key_kernel) || !shared_memory_fits(std::max(key_smem, query_smem))) return false;
  const at::Tensor delta = run_delta<scalar_t>(g);
  const float* delta_ptr = delta.data_ptr<float>();
  launch_kernel(key_kernel, key_tile_items<KeyTraits::kBlockK>(p), key_smem, g, delta_ptr);
  launch_kernel(query_kernel, query_tile_items<QueryTraits::kBlockQ>(p), query_smem, g, delta_ptr);
  return true;
}

template <typename scalar_t>
bool try_backward_tensor_cores(const AttentionGradParams& g) {
  return MHA_HEADDIM_SWITCH(std::max(g.fwd.E, g.fwd.Ev), kHeadDim,
                            [&] { return launch_backward_tensor_cores<scalar_t, kHeadDim>(g); });
}

}  // namespace mha_ext::cuda
