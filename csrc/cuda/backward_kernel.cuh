// Fused attention backward, deterministic and without atomics, in three kernels:
//   1. delta = rowsum(dO * O) - dLSE, one warp per query row;
//   2. dK/dV: each work item owns one (kv batch, key tile) outright, loops over the query heads sharing
//      that K/V (GQA) and over the query tiles, and writes its dK/dV rows once (zero where nothing attends);
//   3. dQ (and dS for the mask/bias gradients): each work item owns one (batch-head, query tile) and loops
//      over the key tiles.
// Both 2 and 3 recompute P from the saved LSE (mirroring csrc/cpu/backward.cpp), so every output element
// is written by one thread summing in a fixed order: bitwise reproducible.
#pragma once

#include <algorithm>

#include "attention/online_softmax.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/static_switch.h"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    delta_kernel(const __grid_constant__ AttentionGradParams g, acc_type<scalar_t>* delta) {
  using acc_t = acc_type<scalar_t>;
  const AttentionParams& p = g.fwd;
  const int Ev = static_cast<int>(p.Ev);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t num_rows = p.grid.numel * p.L;
  for (int64_t item = blockIdx.x; item < ceil_div(num_rows, kWarps); item += gridDim.x) {
    const int64_t r = item * kWarps + warp;  // uniform across the warp
    if (r >= num_rows) continue;
    const int64_t n = r / p.L, i = r % p.L;
    const scalar_t* d_out = g.grad_out.ptr<scalar_t>(p.grid, n) + i * g.grad_out.row_stride;
    const scalar_t* out = static_cast<const scalar_t*>(p.out) + r * p.Ev;
    acc_t sum = 0;
    for (int e = lane; e < Ev; e += kWarpSize) sum += static_cast<acc_t>(d_out[e]) * static_cast<acc_t>(out[e]);
    sum = warp_sum(sum);
    if (lane == 0) delta[r] = g.grad_lse == nullptr ? sum : sum - static_cast<const acc_t*>(g.grad_lse)[r];
  }
}

template <typename acc_t>
struct ProbAndGrad {
  acc_t prob;        // Z * P: P = exp(score - lse) (0 for a row that attended nothing) after dropout's factor Z
  acc_t grad_score;  // dS = P * (Z * dO . v - delta)
};

// For one in-bounds (query row, key row) pair of batch-head n, given dot_qk = q . k and dot_dov = dO . v.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ ProbAndGrad<acc_t> prob_and_grad_from_dots(const HeadScores<scalar_t>& head, int64_t n,
                                                                      int64_t row, int64_t col, acc_t dot_qk,
                                                                      acc_t dot_dov, acc_t lse, acc_t delta) {
  const acc_t prob = probability(head.score(row, col, dot_qk), lse);
  const acc_t factor = dropout_factor<acc_t>(head.p.dropout, n, row, col);
  return {prob * factor, prob * (factor * dot_dov - delta)};
}

// prob_and_grad_from_dots from the pair's rows in shared memory.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ ProbAndGrad<acc_t> prob_and_grad(const HeadScores<scalar_t>& head, int64_t n, int64_t row,
                                                            int64_t col, const acc_t* q_row, const acc_t* k_row, int E,
                                                            const acc_t* grad_out_row, const acc_t* v_row, int Ev,
                                                            acc_t lse, acc_t delta) {
  return prob_and_grad_from_dots(head, n, row, col, dot(q_row, k_row, E), dot(grad_out_row, v_row, Ev), lse, delta);
}

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads)
    key_grad_kernel(const __grid_constant__ AttentionGradParams g, const acc_type<scalar_t>* delta_all) {
  using acc_t = typename Traits::acc_t;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionParams& p = g.fwd;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const int ld_qk = padded(E), ld_v = padded(Ev), ld_s = padded(kBlockK);
  const auto layout = Traits::layout(E, Ev);
  extern __shared__ __align__(128) unsigned char shared_memory[];
  acc_t* smem = reinterpret_cast<acc_t*>(shared_memory);
  acc_t* k_tile = smem + layout.k;
  acc_t* v_tile = smem + layout.v;
  acc_t* grad_k = smem + layout.grad_k;
  acc_t* grad_v = smem + layout.grad_v;
  acc_t* q_tile = smem + layout.q;
  acc_t* grad_out_tile = smem + layout.grad_out;
  acc_t* probs = smem + layout.probs;
  acc_t* grad_scores = smem + layout.grad_scores;
  acc_t* lse = smem + layout.lse;
  acc_t* delta = smem + layout.delta;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);

  const int64_t G = p.grid.group;
  for (int64_t item = blockIdx.x; item < key_tile_items<kBlockK>(p); item += gridDim.x) {
    const auto [m, k0, cols] = key_tile<kBlockK>(p, item);
    const HeadScores<scalar_t> kv_head(p, m * G);
    __syncthreads();  // the previous item is done with shared memory
    load_rows(k_tile, ld_qk, kv_head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
    load_rows(v_tile, ld_v, kv_head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
    zero_rows(grad_k, ld_qk, kBlockK, E);
    zero_rows(grad_v, ld_v, kBlockK, Ev);

    for_each_query_tile<kBlockQ, scalar_t>(g, m, k0, cols, [&](int64_t n, const HeadScores<scalar_t>& head,
                                                              const scalar_t* grad_out, int64_t q0, int rows) {
      load_rows(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
      load_rows(grad_out_tile, ld_v, grad_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride, rows, kBlockQ,
                Ev);
      load_row_values(lse, lse_all + n * p.L + q0, rows, kBlockQ, neg_inf<acc_t>());
      load_row_values(delta, delta_all + n * p.L + q0, rows, kBlockQ, acc_t(0));
      __syncthreads();

      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        ProbAndGrad<acc_t> pg{acc_t(0), acc_t(0)};
        if (i < rows && j < cols) {
          pg = prob_and_grad(head, n, q0 + i, k0 + j, q_tile + i * ld_qk, k_tile + j * ld_qk, E,
                             grad_out_tile + i * ld_v, v_tile + j * ld_v, Ev, lse[i], delta[i]);
        }
        probs[i * ld_s + j] = pg.prob;
        grad_scores[i * ld_s + j] = pg.grad_score;
      }
      __syncthreads();

      // dV += P^T dO;  dK += scale * dS^T Q
      for (int idx = threadIdx.x; idx < kBlockK * Ev; idx += kThreads) {
        const int j = idx / Ev, e = idx % Ev;
        acc_t acc = 0;
        for (int i = 0; i < rows; ++i) acc += probs[i * ld_s + j] * grad_out_tile[i * ld_v + e];
        grad_v[j * ld_v + e] += acc;
      }
      for (int idx = threadIdx.x; idx < kBlockK * E; idx += kThreads) {
        const int j = idx / E, e = idx % E;
        acc_t acc = 0;
        for (int i = 0; i < rows; ++i) acc += grad_scores[i * ld_s + j] * q_tile[i * ld_qk + e];
        grad_k[j * ld_qk + e] += scale * acc;
      }
      __syncthreads();  // before the next query tile overwrites Q, dO, P and dS
    });
    __syncthreads();  // the accumulators are complete (also when every tile was skipped)

    scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * p.S + k0) * p.E;
    scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * p.S + k0) * p.Ev;
    for (int idx = threadIdx.x; idx < cols * E; idx += kThreads)
      grad_key[idx] = static_cast<scalar_t>(grad_k[(idx / E) * ld_qk + idx % E]);
    for (int idx = threadIdx.x; idx < cols * Ev; idx += kThreads)
      grad_value[idx] = static_cast<scalar_t>(grad_v[(idx / Ev) * ld_v + idx % Ev]);
  }
}

template <typename scalar_t, typename Traits>
__global__ void __launch_bounds__(kThreads)
    query_grad_kernel(const __grid_constant__ AttentionGradParams g, const acc_type<scalar_t>* delta_all) {
  using acc_t = typename Traits::acc_t;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  const AttentionParams& p = g.fwd;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const int ld_qk = padded(E), ld_v = padded(Ev), ld_s = padded(kBlockK);
  const auto layout = Traits::layout(E, Ev);
  extern __shared__ __align__(128) unsigned char shared_memory[];
  acc_t* smem = reinterpret_cast<acc_t*>(shared_memory);
  acc_t* q_tile = smem + layout.q;
  acc_t* grad_out_tile = smem + layout.grad_out;
  acc_t* grad_q = smem + layout.grad_q;
  acc_t* k_tile = smem + layout.k;
  acc_t* v_tile = smem + layout.v;
  acc_t* grad_scores = smem + layout.grad_scores;
  acc_t* lse = smem + layout.lse;
  acc_t* delta = smem + layout.delta;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    const scalar_t* grad_out = g.grad_out.ptr<scalar_t>(p.grid, n);
    // One slab per batch-head here (GradScoresLayout::kPerBatchHead): blocks never write the same element.
    acc_t* grad_scores_slab = g.grad_scores.data != nullptr ? g.grad_scores_slab<acc_t>(n) : nullptr;
    __syncthreads();  // the previous item is done with shared memory
    load_rows(q_tile, ld_qk, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, kBlockQ, E);
    load_rows(grad_out_tile, ld_v, grad_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride, rows, kBlockQ, Ev);
    zero_rows(grad_q, ld_qk, kBlockQ, E);
    load_row_values(lse, lse_all + n * p.L + q0, rows, kBlockQ, neg_inf<acc_t>());
    load_row_values(delta, delta_all + n * p.L + q0, rows, kBlockQ, acc_t(0));

    // Tiles it skips leave dS at 0 (zero-filled).
    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      load_rows(k_tile, ld_qk, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, kBlockK, E);
      load_rows(v_tile, ld_v, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, kBlockK, Ev);
      __syncthreads();

      for (int idx = threadIdx.x; idx < kBlockQ * kBlockK; idx += kThreads) {
        const int i = idx / kBlockK, j = idx % kBlockK;
        acc_t ds = 0;
        if (i < rows && j < cols) {
          ds = prob_and_grad(head, n, q0 + i, k0 + j, q_tile + i * ld_qk, k_tile + j * ld_qk, E,
                             grad_out_tile + i * ld_v, v_tile + j * ld_v, Ev, lse[i], delta[i])
                   .grad_score;
          if (grad_scores_slab != nullptr) grad_scores_slab[(q0 + i) * p.S + k0 + j] = ds;
        }
        grad_scores[i * ld_s + j] = ds;
      }
      __syncthreads();

      // dQ += scale * dS K
      for (int idx = threadIdx.x; idx < kBlockQ * E; idx += kThreads) {
        const int i = idx / E, e = idx % E;
        acc_t acc = 0;
        for (int j = 0; j < cols; ++j) acc += grad_scores[i * ld_s + j] * k_tile[j * ld_qk + e];
        grad_q[i * ld_qk + e] += scale * acc;
      }
      __syncthreads();  // before the next key tile overwrites K, V and dS
    });
    __syncthreads();  // the accumulator is complete (also when every tile was skipped)

    acc_t* grad_query = static_cast<acc_t*>(g.grad_query) + (n * p.L + q0) * p.E;
    for (int idx = threadIdx.x; idx < rows * E; idx += kThreads) grad_query[idx] = grad_q[(idx / E) * ld_qk + idx % E];
  }
}

// Kernel 1: delta for every (batch-head, query row), in a buffer that lives as long as the returned tensor.
template <typename scalar_t>
at::Tensor run_delta(const AttentionGradParams& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t num_rows = g.fwd.grid.numel * g.fwd.L;
  at::Tensor delta = device_buffer(num_rows, c10::CppTypeToScalarType<acc_t>::value);
  launch_kernel(delta_kernel<scalar_t>, ceil_div(num_rows, kWarps), 0, g, delta.data_ptr<acc_t>());
  return delta;
}

template <typename scalar_t>
void run_backward(const AttentionGradParams& g) {
  using acc_t = acc_type<scalar_t>;
  const AttentionParams& p = g.fwd;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const at::Tensor delta = run_delta<scalar_t>(g);
  const acc_t* delta_ptr = delta.data_ptr<acc_t>();
  MHA_HEADDIM_SWITCH(std::max(E, Ev), kHeadDim, [&] {
    using KeyTraits = TileTraits<scalar_t, kHeadDim, KeyGradSmem>;
    launch_kernel(key_grad_kernel<scalar_t, KeyTraits>,
                  key_tile_items<KeyTraits::kBlockK>(p), KeyTraits::smem_bytes(E, Ev), g,
                  delta_ptr);
    using QueryTraits = TileTraits<scalar_t, kHeadDim, QueryGradSmem>;
    launch_kernel(query_grad_kernel<scalar_t, QueryTraits>, query_tile_items<QueryTraits::kBlockQ>(p),
                  QueryTraits::smem_bytes(E, Ev), g, delta_ptr);
  });
}

}  // namespace mha_ext::cuda
