// Fused attention forward on tensor cores for fp16/bf16 inputs on sm80 and newer, in the manner of
// FlashAttention-2: each warp owns kMTiles strips of 16 query rows and keeps their scores S, probabilities P
// and output O in registers from the first key tile to the store. S = Q K^T and O += P V are mma.sync
// m16n8k16 products (fp32 accumulators) of operands that ldmatrix reads from padded shared memory (V
// transposed); P is S rounded to 16 bits in registers, already laid out as the A operand of P V. The K tile
// of the next key tile streams in by cp.async while the warps multiply P V, the V tile while they multiply
// Q K^T. The per-element work (scale, causality, masks, bias, dropout) runs on the fragments by their
// (row, column) coordinates: in the kMasked kernels on every element, in the plain ones (no mask, bias or
// dropout) only on tiles with a causal edge or missing keys. Key tiles that causality leaves empty are never
// visited; under a bool mask, those it leaves empty are skipped by the pre-pass's map
// (key_tile_map_kernel.cuh) before their K and V are loaded.
#pragma once

#include <algorithm>

#include "attention/online_softmax.h"
#include "cuda/chunked_rows.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/key_tile_map_kernel.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/static_switch.h"
#include "cuda/tensor_core_launch.cuh"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

// The first key tile from k0 on that the item's rows have work with, or k_end: from the pre-pass's map
// under a bool mask (one byte per key tile, the same for every thread); otherwise every tile before k_end.
template <int kBlockK>
__device__ __forceinline__ int64_t next_key_tile(const uint8_t* item_tiles, int64_t k0, int64_t k_end) {
  if (item_tiles != nullptr) {
    while (k0 < k_end && item_tiles[k0 / kBlockK] == 0) k0 += kBlockK;
  }
  return std::min(k0, k_end);
}

template <typename scalar_t, typename Traits, bool kMasked>
__global__ void __launch_bounds__(kThreads) forward_mma_kernel(const __grid_constant__ AttentionParams p,
                                                                const uint8_t* tile_map) {
// mma.sync with bf16 operands, ldmatrix and cp.async need sm80. A build for older targets gets an empty body,
// which the launcher never runs (it checks the architecture of the kernel's image first).
#if MHA_SM80_DEVICE_CODE
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kHeadDim = Traits::kHeadDim, kMTiles = Traits::kMTiles;
  constexpr int kBlockQ = Traits::kBlockQ, kBlockK = Traits::kBlockK;
  constexpr int kRow = Traits::Tile::kRowElements;
  constexpr int kKeyTiles8 = kBlockK / 8, kOutTiles8 = kHeadDim / 8;
  constexpr bool kBf16 = kIsBf16<scalar_t>;

  mma_t* q_tile = shared_region<mma_t>(Traits::kQ);
  mma_t* k_tile = shared_region<mma_t>(Traits::kK);
  mma_t* v_tile = shared_region<mma_t>(Traits::kV);
  const auto [E, Ev, e_steps, ev_steps] = mma_head_dims(p);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const FragmentLane at(lane);
  const int strip0 = warp * kMTiles * kMmaTile;  // the warp's first row in the query tile
  // What a dot product (plain kernels) or score (kMasked) is multiplied by to give the score, and to give
  // the exponent in base 2.
  const float score_unit = kMasked ? 1.f : static_cast<float>(p.scale);
  const float exponent_scale = score_unit * kLog2e;
  // Per-lane ldmatrix offsets (elements) of the Q, K and V 16 x 16 blocks.
  const int q_lane = (strip0 + RowsThenColumns::row(lane)) * kRow + RowsThenColumns::col(lane);
  const int k_lane = ColumnsThenRows::row(lane) * kRow + ColumnsThenRows::col(lane);
  const int v_lane = RowsThenColumns::row(lane) * kRow + RowsThenColumns::col(lane);

  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    const int64_t k_end = p.causal.key_end(q0, rows, p.S);
    const uint8_t* item_tiles = tile_map != nullptr ? tile_map + item * key_tiles<kBlockK>(p) : nullptr;

    float out[kMTiles][kOutTiles8][4] = {};
    // Per fragment row (m tile, g or g + 8): the running maximum, and this lane's part of the running sum.
    float row_max[kMTiles][2], row_sum[kMTiles][2] = {};
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) row_max[mi][0] = row_max[mi][1] = neg_inf<float>();

    __syncthreads();  // the previous item's warps are done with the Q tile
    copy_tile_async<kBlockQ, kHeadDim>(q_tile, head.q + q0 * p.query.row_stride, p.query.row_stride, rows, E);
    int64_t k0 = next_key_tile<kBlockK>(item_tiles, 0, k_end);
    if (k0 < k_end) {
      copy_tile_async<kBlockK, kHeadDim>(k_tile, head.k + k0 * p.key.row_stride, p.key.row_stride,
                                         static_cast<int>(std::min<int64_t>(kBlockK, p.S - k0)), E);
    }
    ptx::cp_async_commit();

    // One key tile: kEdge tiles check their elements (all of them in the kMasked kernels); the plain
    // kernels' tiles [0, interior_end) are whole and every row of the query tile sees all their keys, so
    // their steps skip the checks, as FlashAttention-2 peels its masking steps off its main loop.
    const auto key_tile_step = [&](auto edge_tag) {
      constexpr bool kEdge = decltype(edge_tag)::value;
      const int cols = kEdge ? static_cast<int>(std::min<int64_t>(kBlockK, k_end - k0)) : kBlockK;
      ptx::cp_async_wait<0>();
      __syncthreads();  // Q and this K tile are in; every warp is done with the previous V tile
      copy_tile_async<kBlockK, kHeadDim>(v_tile, head.v + k0 * p.value.row_stride, p.value.row_stride,
                                         static_cast<int>(std::min<int64_t>(kBlockK, p.S - k0)), Ev);
      ptx::cp_async_commit();

      // S = Q K^T over the 16-wide slices of the head dim (slices past E are zero and skipped).
      float s[kMTiles][kKeyTiles8][4] = {};
      mma_rows_by_rows<kBf16, kHeadDim / kMmaTile, kRow>(s, q_tile + q_lane, k_tile + k_lane, e_steps);

      // Scores, online softmax and P, fragment row by fragment row. Lane (g, t) holds columns 8 nt + 2t + c
      // of rows g (elements 0, 1) and g + 8 (elements 2, 3) of each m tile. The plain kernels keep the dot
      // products and fold the scale into the exponent (scale > 0 there): per element one max, one FFMA and
      // one ex2, as FlashAttention-2; the kMasked ones turn them into scores (HeadScores::score).
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = strip0 + mi * kMmaTile + at.g + 8 * h;
          // Plain kernels' edge tiles: the row sees the tile's keys [0, visible) (causality ends them at key_end).
          const int visible = kMasked || !kEdge ? cols
                                                : static_cast<int>(std::clamp<int64_t>(
                                                      p.causal.key_end(q0 + i, 1, p.S) - k0, 0, cols));
          float tile_max = neg_inf<float>();
#pragma unroll
          for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[mi][nt][2 * h + c];
              const int j = nt * 8 + 2 * at.t + c;
              if constexpr (kMasked) {
                x = i < rows && j < cols ? head.score(q0 + i, k0 + j, x) : neg_inf<float>();
              } else if constexpr (kEdge) {
                x = j < visible ? x : neg_inf<float>();
              }
              tile_max = max_acc(tile_max, x);
            }
          }
          const float row_tile_max = quad_max(tile_max) * score_unit;
          const SoftmaxUpdate<float> update = online_softmax_update(row_max[mi][h], row_tile_max);
          row_max[mi][h] = update.max;
          const float exponent_shift = update.shift * kLog2e;
          float tile_sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[mi][nt][2 * h + c];
              x = ptx::ex2(x * exponent_scale - exponent_shift);  // exp(x score_unit - shift)
              tile_sum += x;  // the normaliser sums the probabilities before dropout
              if (kMasked && p.dropout.active &&
                  dropout_factor<float>(p.dropout, n, q0 + i, k0 + nt * 8 + 2 * at.t + c) == 0.f)
                x = 0.f;
            }
          }
          row_sum[mi][h] = row_sum[mi][h] * update.rescale + tile_sum;
#pragma unroll
          for (int et = 0; et < kOutTiles8; ++et) {
            out[mi][et][2 * h] *= update.rescale;
            out[mi][et][2 * h + 1] *= update.rescale;
          }
        }
      }

      // P, rounded to 16 bits right away (half the registers of the fp32 scores through P V).
      uint32_t probs[kMTiles][kBlockK / kMmaTile][4];
      pack_accumulators<scalar_t>(probs, s);

      const int64_t k_next = next_key_tile<kBlockK>(item_tiles, k0 + kBlockK, k_end);
      ptx::cp_async_wait<0>();
      __syncthreads();  // this V tile is in; every warp is done with this K tile
      if (k_next < k_end) {
        copy_tile_async<kBlockK, kHeadDim>(k_tile, head.k + k_next * p.key.row_stride, p.key.row_stride,
                                           static_cast<int>(std::min<int64_t>(kBlockK, p.S - k_next)), E);
      }
      ptx::cp_async_commit();

      // O += P V over the tile's 16-key slices (slices past `cols` have P = 0 and are skipped).
      const int key_steps = kEdge ? static_cast<int>(ceil_div(cols, kMmaTile)) : kBlockK / kMmaTile;
      mma_fragments_by_rows<kBf16, kRow>(out, probs, v_tile + v_lane, key_steps, ev_steps);
      k0 = k_next;
    };
    if constexpr (!kMasked) {
      const int64_t interior_end = p.causal.key_end(q0, 1, p.S) / kBlockK * kBlockK;
      while (k0 < interior_end) key_tile_step(std::false_type{});
    }
    while (k0 < k_end) key_tile_step(std::true_type{});
    ptx::cp_async_wait<0>();  // an item whose every key tile was skipped still committed its Q copy

    // Rows: output = O * keep_scale / sum (keep_scale: dropout's 1 / (1 - p), applied in fp32 here since
    // fp16 cannot hold e / (1 - p) for p near 1), and the LSE.
    const float keep_scale = static_cast<float>(p.dropout.keep_scale);
    scalar_t* out_rows = static_cast<scalar_t*>(p.out) + (n * p.L + q0) * p.Ev;
    float* lse = static_cast<float*>(p.lse) + n * p.L + q0;
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = strip0 + mi * kMmaTile + at.g + 8 * h;
        const float sum = quad_sum(row_sum[mi][h]);
        if (i >= rows) continue;
        const float factor = keep_scale * output_scale(sum);
#pragma unroll
        for (int et = 0; et < kOutTiles8; ++et) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int e = et * 8 + 2 * at.t + c;
            if (e < Ev) out_rows[int64_t(i) * Ev + e] = static_cast<scalar_t>(out[mi][et][2 * h + c] * factor);
          }
        }
        if (at.t == 0) lse[i] = row_lse(row_max[mi][h], sum);
      }
    }
  }
#endif
}

template <typename scalar_t, bool kMasked>
void run_forward_mma(const AttentionParams& p) {
  AttentionParams params = p;  // with Q, K and V in whole 16-byte chunks
  ChunkedRows staging;
  staging.stage_inputs<scalar_t>(params);
  MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    using Traits = ForwardMmaTraits<kHeadDim, kMasked>;
    const at::Tensor tile_map = key_tile_map<scalar_t, Traits::kBlockQ, Traits::kBlockK>(p);
    launch_kernel(forward_mma_kernel<scalar_t, Traits, kMasked>, query_tile_items<Traits::kBlockQ>(p),
                  Traits::smem_bytes(), params, tile_map.defined() ? tile_map.const_data_ptr<uint8_t>() : nullptr);
  });
}

template <typename scalar_t, bool kMasked>
std::string forward_mma_unavailable(const AttentionParams& p) {
  return MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
    using Traits = ForwardMmaTraits<kHeadDim, kMasked>;
    return tensor_core_launch_unavailable(forward_mma_kernel<scalar_t, Traits, kMasked>, Traits::smem_bytes());
  });
}

}  // namespace mha_ext::cuda
