// WMMA building blocks of the tensor-core kernels (sm80+, m16n16k16, 16-bit operands, fp32 accumulators):
// the operand type of each 16-bit input dtype, views of shared-memory matrices as 16 x 16 tiles, and the
// products of such tiles by one warp or by the whole block.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <string>
#include <type_traits>

#include "cuda/kernel_traits.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/tensor_core_launch.cuh"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

// A call's head dims as the tensor-core kernels use them: E, Ev and their counts of 16-wide tiles.
struct MmaHeadDims {
  int E, Ev, e_tiles, ev_tiles;
};

__device__ __forceinline__ MmaHeadDims mma_head_dims(const AttentionParams& p) {
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  return {E, Ev, static_cast<int>(ceil_div(E, kMmaTile)), static_cast<int>(ceil_div(Ev, kMmaTile))};
}

// Block-wide: `rows` rows of `width` elements of a 16-bit tensor in global memory (rows src_ld apart) into a
// tile of rows of `ld` elements, copied as the WMMA type (the same bits) and zero-filled up to block_rows
// rows and the next multiple of 16 columns, so that products over the padding add nothing.
template <typename scalar_t>
__device__ void load_operand_tile(typename MmaOperand<scalar_t>::type* dst, int ld, const scalar_t* src, int64_t src_ld,
                                  int rows, int block_rows, int width) {
  using mma_t = typename MmaOperand<scalar_t>::type;
  load_tile(dst, ld, reinterpret_cast<const mma_t*>(src), src_ld, rows, block_rows, width, round_up(width, kMmaTile));
}

using RowMajor = nvcuda::wmma::row_major;
using ColMajor = nvcuda::wmma::col_major;
using FragmentAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float>;

// A matrix operand in shared memory, rows of `ld` elements. RowMajor: the matrix itself; ColMajor: the
// transpose of the stored matrix (K stored as rows is K^T), which WMMA reads column-major. tile(i, j) is
// the start of the matrix's 16 x 16 tile in tile-row i and tile-column j.
template <typename mma_t, typename Layout>
struct TileView {
  const mma_t* data;
  int ld;
  __device__ const mma_t* tile(int i, int j) const {
    return std::is_same_v<Layout, RowMajor> ? data + (i * ld + j) * kMmaTile : data + (j * ld + i) * kMmaTile;
  }
};

// One warp: acc += sum over s < steps of A's tile (i, s) times B's tile (s, j).
template <typename mma_t, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_accumulate(FragmentAcc& acc, TileView<mma_t, LayoutA> a, int i,
                                               TileView<mma_t, LayoutB> b, int j, int steps) {
  namespace wmma = nvcuda::wmma;
  for (int s = 0; s < steps; ++s) {
    wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, mma_t, LayoutA> a_frag;
    wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, mma_t, LayoutB> b_frag;
    wmma::load_matrix_sync(a_frag, a.tile(i, s), a.ld);
    wmma::load_matrix_sync(b_frag, b.tile(s, j), b.ld);
    wmma::mma_sync(acc, a_frag, b_frag, acc);
  }
}

// The whole block, no barrier inside: C = A B (or C += A B when `accumulate`) for C's first m_tiles x
// n_tiles tiles (fp32, row-major, rows of ldc), over `steps` 16-deep slices. The warps take C's tiles
// round robin, so each tile is written by one warp.
template <typename mma_t, typename LayoutA, typename LayoutB>
__device__ void block_mma(float* c, int ldc, bool accumulate, TileView<mma_t, LayoutA> a, TileView<mma_t, LayoutB> b,
                          int m_tiles, int n_tiles, int steps) {
  namespace wmma = nvcuda::wmma;
  for (int t = threadIdx.x / kWarpSize; t < m_tiles * n_tiles; t += kWarps) {
    const int i = t / n_tiles, j = t % n_tiles;
    float* c_tile = c + (i * ldc + j) * kMmaTile;
    FragmentAcc acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
    mma_accumulate(acc, a, i, b, j, steps);
    wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
  }
}

}  // namespace mha_ext::cuda
