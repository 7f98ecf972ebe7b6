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

template <typename scalar_t>
constexpr bool kIsBf16 = std::is_same_v<scalar_t, c10::BFloat16>;

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
// cp.async copies; rows past `rows` and columns past `width` are zero-filled without reading global memory.
// `chunked` says that every row start is 16-byte aligned and width a multiple of 8 (the launcher checks);
// otherwise the tile is copied element by element with plain loads. The caller commits and waits.
template <int kRows, int kHeadDim, typename scalar_t>
__device__ __forceinline__ void copy_tile_async(typename MmaOperand<scalar_t>::type* dst, const scalar_t* src,
                                                int64_t ld, int rows, int width, bool chunked) {
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
    if (chunked) {
      ptx::cp_async_16(to, in_bounds ? from : src, in_bounds);
    } else {
#pragma unroll
      for (int e = 0; e < kChunkElements; ++e) {
        const scalar_t x = in_bounds && col + e < width ? from[e] : scalar_t(0);
        memcpy(to + e, &x, sizeof(x));
      }
    }
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

}  // namespace mha_ext::cuda
