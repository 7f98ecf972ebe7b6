// Register-fragment building blocks of the mma.sync kernels (ptx.cuh): 16-bit operand tiles streamed into
// padded shared memory by cp.async, the lane addresses of ldmatrix for each operand, fp32 accumulators
// packed into 16-bit A operands, and reductions over the four lanes that share a fragment row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/kernel_traits.cuh"
#include "cuda/ptx.cuh"
#include "cuda/tile.cuh"

namespace mha_ext::cuda {

// The CUDA type the tensor cores take for each 16-bit input dtype (the same bits, so global memory is read
// as it), and rounding an fp32 value to it (round to nearest even, as torch converts).
template <typename scalar_t>
struct MmaOperand;
template <>
struct MmaOperand<c10::Half> {
  using type = __half;
  __device__ static type round(float x) { return __float2half_rn(x); }
};
template <>
struct MmaOperand<c10::BFloat16> {
  using type = __nv_bfloat16;
  __device__ static type round(float x) { return __float2bfloat16_rn(x); }
};

// The softmax's exponentials are ex2 (ptx.cuh) of exponents in base 2: exp(x) = 2^(x log2 e).
constexpr float kLog2e = 1.4426950408889634f;

template <typename scalar_t>
constexpr bool kIsBf16 = std::is_same_v<scalar_t, c10::BFloat16>;

// A call's head dims as the kernels loop over them: E, Ev and their counts of 16-wide k slices.
struct MmaHeadDims {
  int E, Ev, e_steps, ev_steps;
};
__device__ __forceinline__ MmaHeadDims mma_head_dims(const AttentionParams& p) {
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  return {E, Ev, static_cast<int>(ceil_div(E, kMmaTile)), static_cast<int>(ceil_div(Ev, kMmaTile))};
}

// A lane's place in an m16n8 fragment: rows g and g + 8, columns 2t and 2t + 1 (ptx.cuh).
struct FragmentLane {
  int g, t;
  __device__ explicit FragmentLane(int lane) : g(lane / 4), t(lane % 4) {}
};

// Two fp32 values rounded to the 16-bit operand type and packed as one register (lo in the low half), the
// layout of a pair of adjacent columns in an A fragment.
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack_operands(float lo, float hi) {
  const auto l = MmaOperand<scalar_t>::round(lo), h = MmaOperand<scalar_t>::round(hi);
  uint16_t lo_bits, hi_bits;
  memcpy(&lo_bits, &l, sizeof(lo_bits));
  memcpy(&hi_bits, &h, sizeof(hi_bits));
  return uint32_t(lo_bits) | uint32_t(hi_bits) << 16;
}

// ldmatrix.x4 over a 16 x 16 block of a row-major tile, as lane `lane` addresses it: matrices (rows 0-7,
// cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15). Their registers are an A fragment, or (transposed)
// the B fragments of two n8 tiles where the tile's rows are the k index (V in P V).
struct RowsThenColumns {
  __device__ static int row(int lane) { return (lane / 8 % 2) * 8 + lane % 8; }
  __device__ static int col(int lane) { return (lane / 16) * 8; }
};
// Matrices (rows 0-7, cols 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): the B fragments of two n8 tiles
// where the tile's rows are the n index (K in Q K^T), b[0..1] for rows 0-7 and b[2..3] for rows 8-15.
struct ColumnsThenRows {
  __device__ static int row(int lane) { return (lane / 16) * 8 + lane % 8; }
  __device__ static int col(int lane) { return (lane / 8 % 2) * 8; }
};

// Block-wide: rows [0, kRows) of a PaddedTile<kHeadDim> from global rows `ld` elements apart, as 16-byte
// cp.async copies of the chunks that hold columns [0, width); rows past `rows` and chunks past those are
// zero-filled without reading global memory. The rows are whole chunks (chunked_rows.cuh: the launchers
// stage those that are not), zero past `width`. The caller commits and waits.
template <int kRows, int kHeadDim, typename scalar_t>
__device__ __forceinline__ void copy_tile_async(typename MmaOperand<scalar_t>::type* dst, const scalar_t* src,
                                                int64_t ld, int rows, int width) {
  using mma_t = typename MmaOperand<scalar_t>::type;
  constexpr int kRowChunks = kHeadDim / kChunkElements, kRowsPerPass = kThreads / kRowChunks;
  static_assert(kThreads % kRowChunks == 0 && kRows % kRowsPerPass == 0,
                "every thread issues the same number of copies (a warp-wide cp.async), one column per thread");
  constexpr int kRowElements = PaddedTile<kHeadDim>::kRowElements;
  const int col = threadIdx.x % kRowChunks * kChunkElements;
  const bool col_in_bounds = col < width;
  int r = threadIdx.x / kRowChunks;
  const scalar_t* from = src + r * ld + col;
  mma_t* to = dst + r * kRowElements + col;
  // Not unrolled: an unrolled loop keeps every copy's 64-bit source address live at once, which the
  // accumulators of the 128-wide head dim cannot spare.
#pragma unroll 1
  for (; r < kRows; r += kRowsPerPass, from += kRowsPerPass * ld, to += kRowsPerPass * kRowElements) {
    const bool in_bounds = col_in_bounds && r < rows;
    ptx::cp_async_16(to, in_bounds ? from : src, in_bounds);
  }
}

// Reductions over the four lanes holding one fragment row (lanes 4g .. 4g + 3), the same on all four.
__device__ __forceinline__ float quad_max(float x) {
  x = max_acc(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return max_acc(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Warp products on register accumulators, each over the warp's kMTiles strips of 16 rows. Tiles are
// PaddedTile rows of kRow elements in shared memory; the `*_lane` pointers already hold the calling lane's
// ldmatrix offset (RowsThenColumns or ColumnsThenRows) into the first row and column of the product.

// acc[mi][nt] += A B^T over the first k_steps (<= kKSteps) 16-wide slices of the rows' width: A's rows are
// the strips of `a_lane` (RowsThenColumns), B's the kNTiles8 * 8 rows of `b_lane` (ColumnsThenRows).
// S = Q K^T, dP = dO V^T, and their transposes.
template <bool kBf16, int kKSteps, int kRow, int kMTiles, int kNTiles8, typename mma_t>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[kMTiles][kNTiles8][4], const mma_t* a_lane,
                                                 const mma_t* b_lane, int k_steps) {
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    if (ks >= k_steps) break;
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) ptx::ldmatrix_x4(a[mi], a_lane + mi * kMmaTile * kRow + ks * kMmaTile);
#pragma unroll
    for (int nt = 0; nt < kNTiles8; nt += 2) {
      uint32_t b[4];
      ptx::ldmatrix_x4(b, b_lane + nt * 8 * kRow + ks * kMmaTile);
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        ptx::mma<kBf16>(acc[mi][nt], a[mi], {b[0], b[1]});
        ptx::mma<kBf16>(acc[mi][nt + 1], a[mi], {b[2], b[3]});
      }
    }
  }
}

// acc[mi][nt] += A B over the first k_slices (<= kKSlices) 16-row slices of B and the first n_steps 16-wide
// slices of its columns: A is given as fragments (pack_accumulators), B's rows are the k index, read
// transposed from `b_lane` (RowsThenColumns). O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <bool kBf16, int kRow, int kMTiles, int kKSlices, int kNTiles8, typename mma_t>
__device__ __forceinline__ void mma_fragments_by_rows(float (&acc)[kMTiles][kNTiles8][4],
                                                      const uint32_t (&a)[kMTiles][kKSlices][4], const mma_t* b_lane,
                                                      int k_slices, int n_steps) {
#pragma unroll
  for (int kt = 0; kt < kKSlices; ++kt) {
    if (kt >= k_slices) break;
#pragma unroll
    for (int nt = 0; nt < kNTiles8; nt += 2) {
      if (nt / 2 >= n_steps) break;
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, b_lane + kt * kMmaTile * kRow + nt * 8);
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        ptx::mma<kBf16>(acc[mi][nt], a[mi][kt], {b[0], b[1]});
        ptx::mma<kBf16>(acc[mi][nt + 1], a[mi][kt], {b[2], b[3]});
      }
    }
  }
}

// fp32 accumulators rounded to 16 bits as A fragments: the accumulators of n8 tiles 2 kt and 2 kt + 1 are
// the A fragment of 16-wide k slice kt of the next product (P from S, dS from its fp32 values).
template <typename scalar_t, int kMTiles, int kNTiles8>
__device__ __forceinline__ void pack_accumulators(uint32_t (&a)[kMTiles][kNTiles8 / 2][4],
                                                  const float (&acc)[kMTiles][kNTiles8][4]) {
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int kt = 0; kt < kNTiles8 / 2; ++kt) {
      const float(&lo)[4] = acc[mi][2 * kt];
      const float(&hi)[4] = acc[mi][2 * kt + 1];
      a[mi][kt][0] = pack_operands<scalar_t>(lo[0], lo[1]);
      a[mi][kt][1] = pack_operands<scalar_t>(lo[2], lo[3]);
      a[mi][kt][2] = pack_operands<scalar_t>(hi[0], hi[1]);
      a[mi][kt][3] = pack_operands<scalar_t>(hi[2], hi[3]);
    }
  }
}

}  // namespace mha_ext::cuda
