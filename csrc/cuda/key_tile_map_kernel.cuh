// The pre-pass of the tensor-core forward under a bool mask: for each (batch-head, query tile), one byte
// per key tile saying whether any of its (query, key) pairs is attended (HeadScores::tile_has_work, which
// causality bounds too). The forward then decides a tile from one byte, before loading its K and V, instead
// of scanning the mask tile inside its main loop; the pre-pass reads each mask tile once, coalesced.
#pragma once

#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

template <typename scalar_t, int kBlockQ, int kBlockK>
__global__ void __launch_bounds__(kThreads) key_tile_map_kernel(const __grid_constant__ AttentionParams p,
                                                                 uint8_t* map) {
  for (int64_t item = blockIdx.x; item < query_tile_items<kBlockQ>(p); item += gridDim.x) {
    const auto [n, q0, rows] = query_tile<kBlockQ>(p, item);
    const HeadScores<scalar_t> head(p, n);
    const int64_t k_end = p.causal.key_end(q0, rows, p.S);
    uint8_t* tiles = map + item * key_tiles<kBlockK>(p);
    for (int64_t k0 = 0; k0 < p.S; k0 += kBlockK) {
      const bool work =
          k0 < k_end && head.tile_has_work(q0, rows, k0, static_cast<int>(std::min<int64_t>(kBlockK, k_end - k0)));
      if (threadIdx.x == 0) tiles[k0 / kBlockK] = work;
    }
  }
}

// The map of a call with a bool mask (empty without one): query_tile_items x key_tiles bytes.
template <typename scalar_t, int kBlockQ, int kBlockK>
at::Tensor key_tile_map(const AttentionParams& p) {
  if (!p.has_bool_mask) return at::Tensor();
  at::Tensor map = device_buffer(query_tile_items<kBlockQ>(p) * key_tiles<kBlockK>(p), at::kByte);
  launch_kernel(key_tile_map_kernel<scalar_t, kBlockQ, kBlockK>, query_tile_items<kBlockQ>(p), 0, p,
                map.data_ptr<uint8_t>());
  return map;
}

}  // namespace mha_ext::cuda
