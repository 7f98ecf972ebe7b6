// Device building blocks shared by the CUDA kernels: block-wide tile loads into shared memory, warp
// reductions, and the per-head view that turns a dot product into a masked score and skips empty tiles.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "attention/head_pointers.h"
#include "attention/params.h"
#include "cuda/kernel_traits.cuh"

namespace mha_ext::cuda {

template <typename T>
__device__ __forceinline__ T max_acc(T a, T b) {
  return b > a ? b : a;
}

// Butterfly reductions: every lane ends with the result, combined in the same order on every run.
template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = max_acc(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int n) {
  acc_t sum = 0;
  for (int e = 0; e < n; ++e) sum += a[e] * b[e];
  return sum;
}

// Block-wide: dst[r * ld + c] = src[r * src_ld + c] converted to dst_t for r < rows, c < width; the rest of
// the block_rows x block_width tile is zeroed, so that products over padding rows and columns are 0. Reads
// nothing outside the rows x width of src.
template <typename scalar_t, typename dst_t>
__device__ void load_tile(dst_t* dst, int ld, const scalar_t* src, int64_t src_ld, int rows, int block_rows,
                          int width, int block_width) {
  for (int idx = threadIdx.x; idx < block_rows * block_width; idx += kThreads) {
    const int r = idx / block_width, c = idx % block_width;
    dst[r * ld + c] = r < rows && c < width ? static_cast<dst_t>(src[r * src_ld + c]) : dst_t{};
  }
}

// load_tile for whole rows of `width` columns, converted to the accumulation type.
template <typename scalar_t, typename acc_t>
__device__ void load_rows(acc_t* dst, int ld, const scalar_t* src, int64_t src_ld, int rows, int block_rows,
                          int width) {
  load_tile(dst, ld, src, src_ld, rows, block_rows, width, width);
}

// Block-wide: dst[r * ld + c] = 0 for r < rows, c < width.
template <typename acc_t>
__device__ void zero_rows(acc_t* dst, int ld, int rows, int width) {
  for (int idx = threadIdx.x; idx < rows * width; idx += kThreads) dst[(idx / width) * ld + idx % width] = acc_t(0);
}

// Block-wide: dst[i] = src[i] for i < rows, `fill` for i in [rows, block_rows).
template <typename acc_t>
__device__ void load_row_values(acc_t* dst, const acc_t* src, int rows, int block_rows, acc_t fill) {
  for (int i = threadIdx.x; i < block_rows; i += kThreads) dst[i] = i < rows ? src[i] : fill;
}

// A work item of the kernels that loop over (batch-head, query tile) pairs, item = n * query tiles + tile.
struct QueryTile {
  int64_t n;   // batch-head
  int64_t q0;  // first query row
  int rows;    // query rows in the tile: kBlockQ, fewer in the last tile of a head
};

template <int kBlockQ>
MHA_HOST_DEVICE int64_t query_tile_items(const AttentionParams& p) {
  return p.grid.numel * ceil_div(p.L, kBlockQ);
}

template <int kBlockQ>
__device__ __forceinline__ QueryTile query_tile(const AttentionParams& p, int64_t item) {
  const int64_t q_tiles = ceil_div(p.L, kBlockQ);
  const int64_t q0 = item % q_tiles * kBlockQ;
  return {item / q_tiles, q0, static_cast<int>(std::min<int64_t>(kBlockQ, p.L - q0))};
}

// A work item of the dK/dV kernels, item = m * key tiles + tile: it owns the tile's keys of kv batch m,
// which the query heads m * G ... m * G + G - 1 share (GQA).
struct KeyTile {
  int64_t m;   // kv batch
  int64_t k0;  // first key row
  int cols;    // key rows in the tile: kBlockK, fewer in the last tile of a head
};

// Tiles of kBlockK keys in a head's S keys (the last one may be partial).
template <int kBlockK>
MHA_HOST_DEVICE int64_t key_tiles(const AttentionParams& p) {
  return ceil_div(p.S, kBlockK);
}

template <int kBlockK>
MHA_HOST_DEVICE int64_t key_tile_items(const AttentionParams& p) {
  return p.grid.numel / p.grid.group * key_tiles<kBlockK>(p);
}

template <int kBlockK>
__device__ __forceinline__ KeyTile key_tile(const AttentionParams& p, int64_t item) {
  const int64_t k_tiles = key_tiles<kBlockK>(p);
  const int64_t k0 = item % k_tiles * kBlockK;
  return {item / k_tiles, k0, static_cast<int>(std::min<int64_t>(kBlockK, p.S - k0))};
}

// The launch's dynamic shared memory from byte `offset` on, as T (the layouts' byte offsets).
template <typename T>
__device__ __forceinline__ T* shared_region(int offset) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  return reinterpret_cast<T*>(shared_memory + offset);
}

// One (batch, query head) pair's operands, its masked scores (HeadPointers::masked_score) and which of
// its tiles have work.
template <typename scalar_t>
struct HeadScores : HeadPointers<scalar_t> {
  using acc_t = acc_type<scalar_t>;
  using HeadPointers<scalar_t>::HeadPointers;
  using HeadPointers<scalar_t>::p;
  using HeadPointers<scalar_t>::bool_mask;

  // Block-wide, called by every thread: false when causality or the bool mask leaves every (query, key)
  // pair of rows [q0, q0 + rows) x keys [k0, k0 + cols) out, so the tile can be skipped.
  __device__ bool tile_has_work(int64_t q0, int rows, int64_t k0, int cols) const {
    if (k0 >= p.causal.key_end(q0, rows, p.S)) return false;
    if (bool_mask == nullptr) return true;
    const Operand& m = p.bool_mask;
    // A mask broadcast along rows or columns needs only one of them read.
    const int scan_rows = m.row_stride == 0 ? 1 : rows;
    const int scan_cols = m.col_stride == 0 ? 1 : cols;
    bool found = false;
    for (int idx = threadIdx.x; idx < scan_rows * scan_cols && !found; idx += kThreads) {
      const int i = idx / scan_cols, j = idx % scan_cols;
      found = bool_mask[m.element(q0 + i, k0 + j)];
    }
    return __syncthreads_or(found) != 0;
  }

  __device__ acc_t score(int64_t i, int64_t j, acc_t dot_qk) const { return this->masked_score(i, j, dot_qk); }
};

// Block-wide, in a fixed order: visit(k0, cols) for each tile of kBlockK keys (cols of them, fewer in the
// last) that query rows [q0, q0 + rows) of `head` have work with. Causality ends the keys at q0 + rows - 1;
// HeadScores::tile_has_work skips the rest.
template <int kBlockK, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_key_tile(const HeadScores<scalar_t>& head, int64_t q0, int rows, Visit&& visit) {
  const int64_t k_end = head.p.causal.key_end(q0, rows, head.p.S);
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int cols = static_cast<int>(std::min<int64_t>(kBlockK, k_end - k0));
    if (head.tile_has_work(q0, rows, k0, cols)) visit(k0, cols);
  }
}

// Block-wide, in a fixed order: visit(n, head, grad_out, q0, rows) for each query head n of kv batch m (the
// G heads sharing its K/V), with its dO rows `grad_out` (located once per head: it takes divisions), and each
// of its tiles of kBlockQ query rows that has work with keys [k0, k0 + cols).
template <int kBlockQ, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_query_tile(const AttentionGradParams& g, int64_t m, int64_t k0, int cols,
                                                    Visit&& visit) {
  const AttentionParams& p = g.fwd;
  for (int64_t n = m * p.grid.group; n < (m + 1) * p.grid.group; ++n) {
    const HeadScores<scalar_t> head(p, n);
    const scalar_t* grad_out = g.grad_out.ptr<scalar_t>(p.grid, n);
    // Under causality, query rows before the first that sees key k0 attend none of these keys.
    const int64_t q_start = p.causal.first_query(k0) / kBlockQ * kBlockQ;
    for (int64_t q0 = q_start; q0 < p.L; q0 += kBlockQ) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, p.L - q0));
      if (head.tile_has_work(q0, rows, k0, cols)) visit(n, head, grad_out, q0, rows);
    }
  }
}

}  // namespace mha_ext::cuda
