// Fused attention backward on tensor cores for fp16/bf16 inputs on sm80 and newer, head dims up to 256, on
// the forward's building blocks (mma_fragments.cuh): mma.sync m16n8k16 products of ldmatrix operands from
// padded shared memory, tiles streamed by cp.async, gradients accumulated in registers. Deterministic and
// without atomics, as backward_kernel.cuh: delta first, then
//   - dK/dV: a work item owns 64 keys (16 per warp) of one kv batch and loops over the query heads sharing
//     them and their query tiles. It computes the transposes S^T = K Q^T and dP^T = V dO^T, so that P^T and
//     dS^T come out of the accumulators already laid out as the A operands of dV += P^T dO and
//     dK += dS^T Q: nothing is transposed through shared memory. Above head dim 128, dV and dK are two
//     launches (KeyGrads).
//   - dQ: a work item owns 64 query rows of one batch-head and loops over the key tiles: S = Q K^T,
//     dP = dO V^T, dS, dQ += dS K, and the score gradient for the mask/bias gradients from the fp32 dS.
// P and dS come from prob_and_grad_from_dots on each element, by its (row, column): the same rule as every
// backward kernel; in the plain variants (no mask, bias or dropout: scores_need_masking) from the dot
// products, the scale and the LSE directly, checking bounds and causality only on the tile pairs at an edge.
// Each output element is written once, by one thread summing in a fixed order.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cuda/backward_kernel.cuh"
#include "cuda/chunked_rows.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/static_switch.h"
#include "cuda/tensor_core_launch.cuh"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

// What the plain kernels subtract from a pair's exponent for its query row's LSE: lse log2 e, or +inf for
// a row that attended nothing (its probabilities are 0).
__device__ __forceinline__ float lse_exponent(float lse) {
  return attended_nothing(lse) ? -neg_inf<float>() : lse * kLog2e;
}

// Which gradients a dK/dV kernel accumulates. Up to head dim 128 both, in one pass. Above, a warp's dK and
// dV (kHeadDim / 2 registers each per thread: 256 at 256) do not fit beside S^T and dP^T, so dV and dK run
// as two launches: the dV pass needs neither V nor dP^T, the dK pass computes S^T again (per pair of tiles
// 5 products instead of 4), as FlashAttention-2 would instead spread the two over 8 warps.
enum class KeyGrads { kBoth, kValue, kKey };

// P and dS of pair (row, col), 0 for padding rows and columns. The kMasked kernels (a mask, bias or
// dropout) apply every rule by prob_and_grad_from_dots; the plain ones (causality at most, a positive
// scale) take P = 2^(dot scale log2 e - lse log2 e) (`exponent_scale`; `lse` as lse_exponent gives it)
// directly, and check bounds and causality only on kEdge tile pairs (whole ones have neither:
// tile_pair_is_whole).
template <bool kMasked, bool kEdge, typename scalar_t>
__device__ __forceinline__ ProbAndGrad<float> pair_prob_and_grad(bool in_bounds, const HeadScores<scalar_t>& head,
                                                                 int64_t n, int64_t row, int64_t col, float dot_qk,
                                                                 float dot_dov, float lse, float delta,
                                                                 float exponent_scale) {
  if constexpr (kMasked) {
    return in_bounds ? prob_and_grad_from_dots(head, n, row, col, dot_qk, dot_dov, lse, delta)
                     : ProbAndGrad<float>{0.f, 0.f};
  } else {
    const bool visible = !kEdge || (in_bounds && !head.p.causal.excludes(row, col));
    const float prob = visible ? ptx::ex2(dot_qk * exponent_scale - lse) : 0.f;
    return {prob, prob * (dot_dov - delta)};
  }
}

// Whether every (query, key) pair of a kBlockQ x kBlockK tile pair exists and is visible: whole tiles, and
// the first query row sees every key of the tile (the later ones then do too). The plain kernels run such
// pairs without per-element checks, as FlashAttention-2 peels its masking steps off its main loop.
template <int kBlockQ, int kBlockK>
__device__ __forceinline__ bool tile_pair_is_whole(const AttentionParams& p, int64_t q0, int rows, int64_t k0,
                                                   int cols) {
  return rows == kBlockQ && cols == kBlockK && p.causal.key_end(q0, 1, p.S) >= k0 + kBlockK;
}

// Calls step(std::false_type) for a whole tile pair of a plain kernel, step(std::true_type) otherwise: two
// copies of the per-pair work, the first without checks.
template <bool kMasked, typename Step>
__device__ __forceinline__ void run_tile_pair(bool whole, Step&& step) {
  if (!kMasked && whole) {
    step(std::false_type{});
  } else {
    step(std::true_type{});
  }
}

template <typename scalar_t, typename Traits, bool kMasked, KeyGrads kGrads>
__global__ void __launch_bounds__(kThreads)
    key_grad_mma_kernel(const __grid_constant__ AttentionGradParams g, const float* delta_all) {
// An empty body below sm80, which the launcher never runs (see forward_mma_kernel.cuh).
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kHeadDim = Traits::kHeadDim, kRow = Traits::Tile::kRowElements;
  constexpr int kBlockK = Traits::kOwnedRows, kBlockQ = Traits::kStreamedRows;
  constexpr int kQueryTiles8 = kBlockQ / 8, kHeadTiles8 = kHeadDim / 8;
  constexpr bool kBf16 = kIsBf16<scalar_t>;
  constexpr bool kValueGrad = kGrads != KeyGrads::kKey, kKeyGrad = kGrads != KeyGrads::kValue;
  const AttentionParams& p = g.fwd;
  mma_t* k_tile = shared_region<mma_t>(Traits::kOwnedA);
  mma_t* v_tile = shared_region<mma_t>(Traits::kOwnedB);
  mma_t* q_tile = shared_region<mma_t>(Traits::kStreamedA);
  mma_t* grad_out_tile = shared_region<mma_t>(Traits::kStreamedB);
  const auto [E, Ev, e_steps, ev_steps] = mma_head_dims(p);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const FragmentLane at(lane);
  const int strip0 = warp * kMmaTile;  // the warp's first key in the tile
  const float exponent_scale = static_cast<float>(p.scale) * kLog2e;  // the plain kernels' (pair_prob_and_grad)
  // ldmatrix offsets: K and V strips as A operands; Q and dO rows as the B operand of S^T, dP^T
  // (transposed: Q^T, dO^T), and read transposed as the B operand of dK, dV.
  const int owned_lane = (strip0 + RowsThenColumns::row(lane)) * kRow + RowsThenColumns::col(lane);
  const int streamed_lane = ColumnsThenRows::row(lane) * kRow + ColumnsThenRows::col(lane);
  const int streamed_lane_transposed = RowsThenColumns::row(lane) * kRow + RowsThenColumns::col(lane);

  for (int64_t item = blockIdx.x; item < key_tile_items<kBlockK>(p); item += gridDim.x) {
    const auto [m, k0, cols] = key_tile<kBlockK>(p, item);
    const HeadScores<scalar_t> kv_head(p, m * p.grid.group);
    // Arrays a pass does not accumulate keep one (unused) tile.
    float grad_k[1][kKeyGrad ? kHeadTiles8 : 1][4] = {}, grad_v[1][kValueGrad ? kHeadTiles8 : 1][4] = {};
    __syncthreads();  // the previous item's warps are done with the K and V tiles
    copy_tile_async<kBlockK, kHeadDim>(k_tile, kv_head.k + k0 * p.key.row_stride, p.key.row_stride, cols, E);
    if constexpr (kKeyGrad) {
      copy_tile_async<kBlockK, kHeadDim>(v_tile, kv_head.v + k0 * p.value.row_stride, p.value.row_stride, cols, Ev);
    }
    ptx::cp_async_commit();

    for_each_query_tile<kBlockQ, scalar_t>(g, m, k0, cols, [&](int64_t n, const HeadScores<scalar_t>& head,
                                                              const scalar_t* grad_out, int64_t q0, int rows) {
      __syncthreads();  // every warp is done with the previous query tile
      copy_tile_async<kBlockQ, kHeadDim>(q_tile, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, E);
      copy_tile_async<kBlockQ, kHeadDim>(grad_out_tile, grad_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride,
                                         rows, Ev);
      ptx::cp_async_commit();
      // LSE and delta of the lane's query columns 8 nt + 2t + c, straight into registers while the tiles
      // stream in (the plain kernels keep the LSE as lse_exponent).
      float lse[kQueryTiles8][2], delta[kQueryTiles8][2];
#pragma unroll
      for (int nt = 0; nt < kQueryTiles8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int query = nt * 8 + 2 * at.t + c;
          const int64_t row = n * p.L + q0 + query;
          const float row_lse = query < rows ? static_cast<const float*>(p.lse)[row] : neg_inf<float>();
          lse[nt][c] = kMasked ? row_lse : lse_exponent(row_lse);
          delta[nt][c] = kKeyGrad && query < rows ? delta_all[row] : 0.f;
        }
      }
      ptx::cp_async_wait<0>();
      __syncthreads();  // Q and dO (and, first, K and V) are in

      run_tile_pair<kMasked>(tile_pair_is_whole<kBlockQ, kBlockK>(p, q0, rows, k0, cols), [&](auto edge_tag) {
        constexpr bool kEdge = decltype(edge_tag)::value;
        float scores_t[1][kQueryTiles8][4] = {}, grad_probs_t[1][kQueryTiles8][4] = {};
        mma_rows_by_rows<kBf16, kHeadDim / kMmaTile, kRow>(scores_t, k_tile + owned_lane, q_tile + streamed_lane,
                                                           e_steps);
        if constexpr (kKeyGrad) {
          mma_rows_by_rows<kBf16, kHeadDim / kMmaTile, kRow>(grad_probs_t, v_tile + owned_lane,
                                                             grad_out_tile + streamed_lane, ev_steps);
        }
        // Lane (g, t) holds keys g and g + 8 of the warp's strip, queries 8 nt + 2t + c: P^T and dS^T in place.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = strip0 + at.g + 8 * h;
#pragma unroll
          for (int nt = 0; nt < kQueryTiles8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int query = nt * 8 + 2 * at.t + c;
              float& prob = scores_t[0][nt][2 * h + c];
              float& grad_score = grad_probs_t[0][nt][2 * h + c];
              const ProbAndGrad<float> pg = pair_prob_and_grad<kMasked, kEdge>(
                  key < cols && query < rows, head, n, q0 + query, k0 + key, prob, grad_score, lse[nt][c],
                  delta[nt][c], exponent_scale);
              prob = pg.prob;
              grad_score = pg.grad_score;
            }
          }
        }
        // dV += P^T dO, dK += dS^T Q (scaled once, at the end), over the tile's 16-row query slices.
        const int query_steps = kEdge ? static_cast<int>(ceil_div(rows, kMmaTile)) : kBlockQ / kMmaTile;
        if constexpr (kValueGrad) {
          uint32_t probs_t[1][kQueryTiles8 / 2][4];
          pack_accumulators<scalar_t>(probs_t, scores_t);
          mma_fragments_by_rows<kBf16, kRow>(grad_v, probs_t, grad_out_tile + streamed_lane_transposed, query_steps,
                                             ev_steps);
        }
        if constexpr (kKeyGrad) {
          uint32_t grad_scores_t[1][kQueryTiles8 / 2][4];
          pack_accumulators<scalar_t>(grad_scores_t, grad_probs_t);
          mma_fragments_by_rows<kBf16, kRow>(grad_k, grad_scores_t, q_tile + streamed_lane_transposed, query_steps,
                                             e_steps);
        }
      });
    });
    ptx::cp_async_wait<0>();  // an item whose every query tile was skipped still committed its K and V copies

    // Every key row of the tile is written (zeros where nothing attends): grad_key/grad_value start unset.
    const float scale = static_cast<float>(p.scale);
    scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * p.S + k0) * p.E;
    scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * p.S + k0) * p.Ev;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = strip0 + at.g + 8 * h;
      if (key >= cols) continue;
#pragma unroll
      for (int et = 0; et < kHeadTiles8; ++et) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = et * 8 + 2 * at.t + c;
          if constexpr (kKeyGrad) {
            if (e < E) grad_key[int64_t(key) * E + e] = static_cast<scalar_t>(scale * grad_k[0][et][2 * h + c]);
          }
          if constexpr (kValueGrad) {
            if (e < Ev) grad_value[int64_t(key) * Ev + e] = static_cast<scalar_t>(grad_v[0][et][2 * h + c]);
          }
        }
      }
    }
  }
#endif
}

template <typename scalar_t, typename Traits, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    query_grad_mma_kernel(const __grid_constant__ AttentionGradParams g, const float* delta_all) {
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kHeadDim = Traits::kHeadDim, kRow = Traits::Tile::kRowElements;
  constexpr int kBlockQ = Traits::kOwnedRows, kBlockK = Traits::kStreamedRows;
  constexpr int kKeyTiles8 = kBlockK / 8, kHeadTiles8 = kHeadDim / 8;
  constexpr bool kBf16 = kIsBf16<scalar_t>;
  const AttentionParams& p = g.fwd;
  mma_t* q_tile = shared_region<mma_t>(Traits::kOwnedA);
  mma_t* grad_out_tile = shared_region<mma_t>(Traits::kOwnedB);
  mma_t* k_tile = shared_region<mma_t>(Traits::kStreamedA);
  mma_t* v_tile = shared_region<mma_t>(Traits::kStreamedB);
  const auto [E, Ev, e_steps, ev_steps] = mma_head_dims(p);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const FragmentLane at(lane);
  const int strip0 = warp * kMmaTile;  // the warp's first query row in the tile
  const float exponent_scale = static_cast<float>(p.scale) * kLog2e;  // the plain kernels' (pair_prob_and_grad)
  // ldmatrix offsets: Q and dO strips as A operands; K and V rows as the B operand of S, dP (K^T, V^T), and
  // K read transposed as the B operand of dQ.
  const int owned_lane = (strip0 + RowsThenColumns::row(lane)) * kRow + RowsThenColumns::col(lane);
  const int streamed_lane = ColumnsThenRows::row(lane) * kRow + ColumnsThenRows::col(lane);
  const int streamed_lane_transposed = RowsThenColumns::row(lane) * kRow + RowsThenColumns::col(lane);

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    // One slab per batch-head here (GradScoresLayout::kPerBatchHead): blocks never write the same element.
    // Only a mask or bias has a gradient, so only the kMasked kernels write one.
    float* grad_scores_slab = kMasked && g.grad_scores.data != nullptr ? g.grad_scores_slab<float>(n) : nullptr;
    // LSE and delta of the lane's rows g and g + 8.
    float lse[2], delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = strip0 + at.g + 8 * h;
      lse[h] = i < rows ? static_cast<const float*>(p.lse)[n * p.L + q0 + i] : neg_inf<float>();
      if constexpr (!kMasked) lse[h] = lse_exponent(lse[h]);
      delta[h] = i < rows ? delta_all[n * p.L + q0 + i] : 0.f;
    }
    float grad_q[1][kHeadTiles8][4] = {};
    __syncthreads();  // the previous item's warps are done with the Q and dO tiles
    copy_tile_async<kBlockQ, kHeadDim>(q_tile, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, E);
    copy_tile_async<kBlockQ, kHeadDim>(grad_out_tile, g.grad_out.ptr<scalar_t>(p.grid, n) + q0 * g.grad_out.row_stride,
                                       g.grad_out.row_stride, rows, Ev);
    ptx::cp_async_commit();

    // Tiles it skips leave dS at 0 (zero-filled).
    for_each_key_tile<kBlockK>(head, q0, rows, [&](int64_t k0, int cols) {
      __syncthreads();  // every warp is done with the previous key tile
      copy_tile_async<kBlockK, kHeadDim>(k_tile, head.k + k0 * p.key.row_stride, p.key.row_stride, cols, E);
      copy_tile_async<kBlockK, kHeadDim>(v_tile, head.v + k0 * p.value.row_stride, p.value.row_stride, cols, Ev);
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncthreads();  // K and V (and, first, Q and dO) are in

      run_tile_pair<kMasked>(tile_pair_is_whole<kBlockQ, kBlockK>(p, q0, rows, k0, cols), [&](auto edge_tag) {
        constexpr bool kEdge = decltype(edge_tag)::value;
        float scores[1][kKeyTiles8][4] = {}, grad_probs[1][kKeyTiles8][4] = {};
        mma_rows_by_rows<kBf16, kHeadDim / kMmaTile, kRow>(scores, q_tile + owned_lane, k_tile + streamed_lane,
                                                           e_steps);
        mma_rows_by_rows<kBf16, kHeadDim / kMmaTile, kRow>(grad_probs, grad_out_tile + owned_lane,
                                                           v_tile + streamed_lane, ev_steps);
        // Lane (g, t) holds rows g and g + 8 of the warp's strip, keys 8 nt + 2t + c: dS in place.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = strip0 + at.g + 8 * h;
#pragma unroll
          for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int j = nt * 8 + 2 * at.t + c;
              const bool in_bounds = i < rows && j < cols;
              float& grad_score = scores[0][nt][2 * h + c];
              grad_score = pair_prob_and_grad<kMasked, kEdge>(in_bounds, head, n, q0 + i, k0 + j, grad_score,
                                                              grad_probs[0][nt][2 * h + c], lse[h], delta[h],
                                                              exponent_scale)
                               .grad_score;
              if (in_bounds && grad_scores_slab != nullptr) grad_scores_slab[(q0 + i) * p.S + k0 + j] = grad_score;
            }
          }
        }
        uint32_t grad_scores[1][kKeyTiles8 / 2][4];
        pack_accumulators<scalar_t>(grad_scores, scores);
        // dQ += dS K (scaled once, at the end), over the tile's 16-key slices.
        const int key_steps = kEdge ? static_cast<int>(ceil_div(cols, kMmaTile)) : kBlockK / kMmaTile;
        mma_fragments_by_rows<kBf16, kRow>(grad_q, grad_scores, k_tile + streamed_lane_transposed, key_steps,
                                           e_steps);
      });
    });
    ptx::cp_async_wait<0>();  // an item whose every key tile was skipped still committed its Q and dO copies

    const float scale = static_cast<float>(p.scale);
    float* grad_query = static_cast<float*>(g.grad_query) + (n * p.L + q0) * p.E;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = strip0 + at.g + 8 * h;
      if (i >= rows) continue;
#pragma unroll
      for (int et = 0; et < kHeadTiles8; ++et) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = et * 8 + 2 * at.t + c;
          if (e < E) grad_query[int64_t(i) * E + e] = scale * grad_q[0][et][2 * h + c];
        }
      }
    }
  }
#endif
}

template <typename scalar_t, bool kMasked>
void run_backward_mma(const AttentionGradParams& g) {
  const AttentionParams& p = g.fwd;
  const at::Tensor delta = run_delta<scalar_t>(g);
  const float* delta_ptr = delta.const_data_ptr<float>();
  AttentionGradParams params = g;  // with Q, K, V and dO in whole 16-byte chunks
  ChunkedRows staging;
  staging.stage_inputs<scalar_t>(params.fwd);
  staging.stage<scalar_t>(params.grad_out, p.grid, p.L, p.Ev);
  MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    using KeyTraits = KeyGradMmaTraits<kHeadDim, kMasked>;
    using QueryTraits = QueryGradMmaTraits<kHeadDim, kMasked>;
    const auto launch_key_grads = [&](auto grads_tag) {
      launch_kernel(key_grad_mma_kernel<scalar_t, KeyTraits, kMasked, decltype(grads_tag)::value>,
                    key_tile_items<KeyTraits::kOwnedRows>(p), KeyTraits::smem_bytes(), params, delta_ptr);
    };
    if constexpr (KeyTraits::kJointKeyGrads) {
      launch_key_grads(std::integral_constant<KeyGrads, KeyGrads::kBoth>{});
    } else {
      launch_key_grads(std::integral_constant<KeyGrads, KeyGrads::kValue>{});
      launch_key_grads(std::integral_constant<KeyGrads, KeyGrads::kKey>{});
    }
    launch_kernel(query_grad_mma_kernel<scalar_t, QueryTraits, kMasked>,
                  query_tile_items<QueryTraits::kOwnedRows>(p), QueryTraits::smem_bytes(), params, delta_ptr);
  });
}

template <typename scalar_t, bool kMasked>
std::string backward_mma_unavailable(const AttentionParams& p) {
  return MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    // The kernels of a head dim are built for the same targets: one image answers for them all.
    using KeyTraits = KeyGradMmaTraits<kHeadDim, kMasked>;
    using QueryTraits = QueryGradMmaTraits<kHeadDim, kMasked>;
    return tensor_core_launch_unavailable(query_grad_mma_kernel<scalar_t, QueryTraits, kMasked>,
                                          std::max(KeyTraits::smem_bytes(), QueryTraits::smem_bytes()));
  });
}

}  // namespace mha_ext::cuda
