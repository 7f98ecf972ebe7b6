// Fused attention backward on tensor cores for fp16/bf16 inputs on sm80 and newer with a head dim above 128
// (backward_mma_kernel.cuh runs the others; run_backward_tensor_cores below chooses): the three kernels of
// backward_kernel.cuh (delta; dK/dV per owned key tile; dQ and the score gradient per owned query tile),
// with every product on WMMA: S = Q K^T and dP = dO V^T into fp32 tiles, then P and dS from them in fp32 by
// prob_and_grad_from_dots, rounded to 16-bit operands for dV += P^T dO, dK += dS^T Q and dQ += dS K,
// which accumulate in fp32 in shared memory. The score gradient the mask/bias gradients need is written
// from the fp32 dS. Each accumulator tile is written by one warp in a fixed order: bitwise reproducible.
#pragma once

#include <algorithm>

#include "cuda/backward_kernel.cuh"
#include "cuda/backward_mma_kernel.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/mma.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

// The shared-memory tiles both kernels have (KeyGradTensorCoreSmem and QueryGradTensorCoreSmem name them
// alike) and the steps they share for a (query tile, key tile) pair: loading Q, dO, LSE and delta, or K and
// V; S = Q K^T and dP = dO V^T; P and dS from those. Block-wide methods, no barrier inside.
template <typename scalar_t, typename Traits>
struct BackwardTilePair {
  using mma_t = typename MmaOperand<scalar_t>::type;
  using Layout = typename Traits::Layout;
  static constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionGradParams& g;
  const MmaHeadDims dims;
  const Layout layout;
  mma_t* const q;
  mma_t* const grad_out;
  mma_t* const k;
  mma_t* const v;
  float* const scores;
  float* const grad_probs;
  float* const lse;
  float* const delta;

  __device__ explicit BackwardTilePair(const AttentionGradParams& g_)
      : g(g_),
        dims(mma_head_dims(g.fwd)),
        layout(Traits::layout(dims.E, dims.Ev)),
        q(shared_region<mma_t>(layout.q)),
        grad_out(shared_region<mma_t>(layout.grad_out)),
        k(shared_region<mma_t>(layout.k)),
        v(shared_region<mma_t>(layout.v)),
        scores(shared_region<float>(layout.scores)),
        grad_probs(shared_region<float>(layout.grad_probs)),
        lse(shared_region<float>(layout.lse)),
        delta(shared_region<float>(layout.delta)) {}

  // Rows [q0, q0 + rows) of batch-head n: Q and dO zero-padded to kBlockQ rows, LSE and delta.
  __device__ void load_queries(const HeadScores<scalar_t>& head, int64_t n, int64_t q0, int rows,
                               const float* delta_all) const {
    const AttentionParams& p = g.fwd;
    load_operand_tile(q, layout.ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, dims.E);
    load_operand_tile(grad_out, layout.ld_v, g.grad_out.ptr<scalar_t>(p.grid, n) + q0 * g.grad_out.row_stride,
                      g.grad_out.row_stride, rows, kBlockQ, dims.Ev);
    load_row_values(lse, static_cast<const float*>(p.lse) + n * p.L + q0, rows, kBlockQ, neg_inf<float>());
    load_row_values(delta, delta_all + n * p.L + q0, rows, kBlockQ, 0.f);
  }

  // Key rows [k0, k0 + cols) of `head`'s K and V, zero-padded to kBlockK rows.
  __device__ void load_keys(const HeadScores<scalar_t>& head, int64_t k0, int cols) const {
    const AttentionParams& p = g.fwd;
    load_operand_tile(k, layout.ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, dims.E);
    load_operand_tile(v, layout.ld_v, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, dims.Ev);
  }

  // S = Q K^T and dP = dO V^T over the pair's 16 x 16 tiles (K^T and V^T read from their rows).
  __device__ void scores_and_grad_probs(int query_tiles, int key_tiles) const {
    block_mma(scores, layout.ld_scores, false, TileView<mma_t, RowMajor>{q, layout.ld_qk},
              TileView<mma_t, ColMajor>{k, layout.ld_qk}, query_tiles, key_tiles, dims.e_tiles);
    block_mma(grad_probs, layout.ld_scores, false, TileView<mma_t, RowMajor>{grad_out, layout.ld_v},
              TileView<mma_t, ColMajor>{v, layout.ld_v}, query_tiles, key_tiles, dims.ev_tiles);
  }

  // P and dS of the pair's row i and key j (both in bounds), in fp32.
  __device__ ProbAndGrad<float> prob_and_grad(const HeadScores<scalar_t>& head, int64_t n, int64_t q0, int64_t k0,
                                              int i, int j) const {
    const int at = i * layout.ld_scores + j;
    return prob_and_grad_from_dots(head, n, q0 + i, k0 + j, scores[at], grad_probs[at], lse[i], delta[i]);
  }
};

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads)
    key_grad_tensor_core_kernel(const __grid_constant__ AttentionGradParams g, const float* delta_all) {
// An empty body below sm80, which the launcher never runs (see forward_mma_kernel.cuh).
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionParams& p = g.fwd;
  const BackwardTilePair<scalar_t, Traits> pair(g);
  const MmaHeadDims& dims = pair.dims;
  const auto& layout = pair.layout;
  float* grad_k = shared_region<float>(layout.grad_k);
  float* grad_v = shared_region<float>(layout.grad_v);
  mma_t* probs = shared_region<mma_t>(layout.probs);
  mma_t* grad_scores = shared_region<mma_t>(layout.grad_scores);
  // dV += P^T dO and dK += dS^T Q: P^T and dS^T are read from their rows.
  const TileView<mma_t, ColMajor> probs_transposed{probs, layout.ld_probs}, grad_scores_transposed{grad_scores,
                                                                                                    layout.ld_probs};
  const TileView<mma_t, RowMajor> grad_out_view{pair.grad_out, layout.ld_v}, q_view{pair.q, layout.ld_qk};

  for (int64_t item = blockIdx.x; item < key_tile_items<kBlockK>(p); item += gridDim.x) {
    const auto [m, k0, cols] = key_tile<kBlockK>(p, item);
    const int key_tiles = static_cast<int>(ceil_div(cols, kMmaTile));
    __syncthreads();  // the previous item is done with shared memory
    pair.load_keys(HeadScores<scalar_t>(p, m * p.grid.group), k0, cols);
    zero_rows(grad_k, layout.ld_grad_qk, kBlockK, dims.e_tiles * kMmaTile);
    zero_rows(grad_v, layout.ld_grad_v, kBlockK, dims.ev_tiles * kMmaTile);

    for_each_query_tile<kBlockQ, scalar_t>(p, m, k0, cols, [&](int64_t n, const HeadScores<scalar_t>& head,
                                                              int64_t q0, int rows) {
      const int query_tiles = static_cast<int>(ceil_div(rows, kMmaTile));
      pair.load_queries(head, n, q0, rows, delta_all);
      __syncthreads();
      pair.scores_and_grad_probs(query_tiles, key_tiles);
      __syncthreads();

      // P and dS as 16-bit operands, 0 for padding rows and columns.
      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        const ProbAndGrad<float> pg = i < rows && j < cols ? pair.prob_and_grad(head, n, q0, k0, i, j)
                                                           : ProbAndGrad<float>{0.f, 0.f};
        probs[i * layout.ld_probs + j] = MmaOperand<scalar_t>::round(pg.prob);
        grad_scores[i * layout.ld_probs + j] = MmaOperand<scalar_t>::round(pg.grad_score);
      }
      __syncthreads();

      // dV += P^T dO;  dK += dS^T Q (scaled once, at the end), over the tile's query rows.
      block_mma(grad_v, layout.ld_grad_v, true, probs_transposed, grad_out_view, key_tiles, dims.ev_tiles,
                query_tiles);
      block_mma(grad_k, layout.ld_grad_qk, true, grad_scores_transposed, q_view, key_tiles, dims.e_tiles,
                query_tiles);
      __syncthreads();  // before the next query tile overwrites Q, dO, S, dP, P and dS
    });
    __syncthreads();  // the accumulators are complete (also when every tile was skipped)

    const float scale = static_cast<float>(p.scale);
    const int E = dims.E, Ev = dims.Ev;
    scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * p.S + k0) * p.E;
    scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * p.S + k0) * p.Ev;
    for (int idx = threadIdx.x; idx < cols * E; idx += kThreads)
      grad_key[idx] = static_cast<scalar_t>(scale * grad_k[(idx / E) * layout.ld_grad_qk + idx % E]);
    for (int idx = threadIdx.x; idx < cols * Ev; idx += kThreads)
      grad_value[idx] = static_cast<scalar_t>(grad_v[(idx / Ev) * layout.ld_grad_v + idx % Ev]);
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
  const BackwardTilePair<scalar_t, Traits> pair(g);
  const MmaHeadDims& dims = pair.dims;
  const auto& layout = pair.layout;
  float* grad_q = shared_region<float>(layout.grad_q);
  mma_t* grad_scores = shared_region<mma_t>(layout.grad_scores);
  // dQ += dS K.
  const TileView<mma_t, RowMajor> grad_scores_view{grad_scores, layout.ld_probs}, k_view{pair.k, layout.ld_qk};

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const int query_tiles = static_cast<int>(ceil_div(rows, kMmaTile));
    const HeadScores<scalar_t> head(p, n);
    // One slab per batch-head here (GradScoresLayout::kPerBatchHead): blocks never write the same element.
    float* grad_scores_slab = g.grad_scores.data != nullptr ? g.grad_scores_slab<float>(n) : nullptr;
    __syncthreads();  // the previous item is done with shared memory
    pair.load_queries(head, n, q0, rows, delta_all);
    zero_rows(grad_q, layout.ld_grad_qk, kBlockQ, dims.e_tiles * kMmaTile);

    // Tiles it skips leave dS at 0 (zero-filled).
    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      const int key_tiles = static_cast<int>(ceil_div(cols, kMmaTile));
      pair.load_keys(head, k0, cols);
      __syncthreads();
      pair.scores_and_grad_probs(query_tiles, key_tiles);
      __syncthreads();

      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        float ds = 0.f;
        if (i < rows && j < cols) {
          ds = pair.prob_and_grad(head, n, q0, k0, i, j).grad_score;
          if (grad_scores_slab != nullptr) grad_scores_slab[(q0 + i) * p.S + k0 + j] = ds;
        }
        grad_scores[i * layout.ld_probs + j] = MmaOperand<scalar_t>::round(ds);
      }
      __syncthreads();

      // dQ += dS K (scaled once, at the end)
      block_mma(grad_q, layout.ld_grad_qk, true, grad_scores_view, k_view, query_tiles, dims.e_tiles, key_tiles);
      __syncthreads();  // before the next key tile overwrites K, V, S, dP and dS
    });
    __syncthreads();  // the accumulator is complete (also when every tile was skipped)

    const float scale = static_cast<float>(p.scale);
    const int E = dims.E;
    float* grad_query = static_cast<float*>(g.grad_query) + (n * p.L + q0) * p.E;
    for (int idx = threadIdx.x; idx < rows * E; idx += kThreads)
      grad_query[idx] = scale * grad_q[(idx / E) * layout.ld_grad_qk + idx % E];
  }
#endif
}

// Why the tensor-core backward's two kernels for head dims up to kHeadDim cannot launch, in words; empty
// where they can.
template <typename scalar_t, int kHeadDim>
std::string backward_tensor_cores_unavailable_for(const AttentionParams& p) {
  using KeyTraits = BackwardTensorCoreTraits<KeyGradTensorCoreSmem, kHeadDim>;
  using QueryTraits = BackwardTensorCoreTraits<QueryGradTensorCoreSmem, kHeadDim>;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  // Both kernels are built for the same targets: the key kernel's image answers for the pair.
  return tensor_core_launch_unavailable(key_grad_tensor_core_kernel<scalar_t, KeyTraits>,
                                        std::max(KeyTraits::smem_bytes(E, Ev), QueryTraits::smem_bytes(E, Ev)));
}

template <typename scalar_t, int kHeadDim>
void launch_backward_tensor_cores(const AttentionGradParams& g) {
  using KeyTraits = BackwardTensorCoreTraits<KeyGradTensorCoreSmem, kHeadDim>;
  using QueryTraits = BackwardTensorCoreTraits<QueryGradTensorCoreSmem, kHeadDim>;
  const auto key_kernel = key_grad_tensor_core_kernel<scalar_t, KeyTraits>;
  const auto query_kernel = query_grad_tensor_core_kernel<scalar_t, QueryTraits>;
  const AttentionParams& p = g.fwd;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const size_t key_smem = KeyTraits::smem_bytes(E, Ev), query_smem = QueryTraits::smem_bytes(E, Ev);
  const at::Tensor delta = run_delta<scalar_t>(g);
  const float* delta_ptr = delta.data_ptr<float>();
  launch_kernel(key_kernel, key_tile_items<KeyTraits::kBlockK>(p), key_smem, g, delta_ptr);
  launch_kernel(query_kernel, query_tile_items<QueryTraits::kBlockQ>(p), query_smem, g, delta_ptr);
}

// Head dims up to 128 on the mma.sync kernels (backward_mma_kernel.cuh), 129..256 on the WMMA ones above,
// whose registers are not needed for dK and dV accumulators of that width.
template <typename scalar_t>
void run_backward_tensor_cores(const AttentionGradParams& g) {
  MHA_HEADDIM_SWITCH(std::max(g.fwd.E, g.fwd.Ev), kHeadDim, [&] {
    if constexpr (kHeadDim <= kMaxMmaBackwardHeadDim) {
      launch_backward_mma<scalar_t, kHeadDim>(g);
    } else {
      launch_backward_tensor_cores<scalar_t, kHeadDim>(g);
    }
  });
}

template <typename scalar_t>
std::string backward_tensor_cores_unavailable(const AttentionParams& p) {
  return MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    if constexpr (kHeadDim <= kMaxMmaBackwardHeadDim) {
      return backward_mma_unavailable<scalar_t, kHeadDim>(p);
    } else {
      return backward_tensor_cores_unavailable_for<scalar_t, kHeadDim>(p);
    }
  });
}

}  // namespace mha_ext::cuda
