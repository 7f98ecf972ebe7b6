// Operand rows as the tensor-core kernels read them: whole 16-byte chunks (copy_tile_async's cp.async), each
// row starting on 16 bytes and holding its width rounded up to 8 elements. Host code: a call whose Q, K, V
// or dO rows are not so (a head dim not a multiple of 8, an odd stride or offset) has them staged first into
// zero-padded buffers, one copy each, as FlashAttention-2's wrapper pads head dims to multiples of 8; the
// kernels then have one load path and no element-by-element code in their loops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <vector>

#include "attention/params.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch_kernel.cuh"

namespace mha_ext::cuda {

// Whether every row of `op` (a (grid, rows, width) operand, unit column stride) starts on 16 bytes and
// `width` is a multiple of 8 elements.
template <typename scalar_t>
bool rows_are_chunked(const Operand& op, const BatchGrid& grid, int64_t width) {
  static_assert(sizeof(scalar_t) * kChunkElements == kChunkBytes);
  constexpr int64_t kElements = kChunkElements;
  if (width % kElements != 0 || reinterpret_cast<uintptr_t>(op.data) % kChunkBytes != 0) return false;
  if (op.row_stride % kElements != 0) return false;
  for (int d = 0; d < grid.ndim; ++d) {
    if (grid.sizes[d] > 1 && op.grid_strides[d] % kElements != 0) return false;
  }
  return true;
}

// The staged copies of one call, alive until its kernels are queued (the caching allocator keeps them from
// other work on the stream until those kernels are done).
class ChunkedRows {
 public:
  // Leaves `op` as it is when its rows are chunked; otherwise copies its (grid, rows, width) elements into a
  // zero-padded buffer with rows of width rounded up to 8 and points `op` at it. Grid dims the operand
  // broadcasts over (stride 0: GQA's K and V) stay broadcast.
  template <typename scalar_t>
  void stage(Operand& op, const BatchGrid& grid, int64_t rows, int64_t width) {
    if (rows_are_chunked<scalar_t>(op, grid, width)) return;
    std::vector<int64_t> sizes, strides;
    for (int d = 0; d < grid.ndim; ++d) {
      sizes.push_back(op.grid_strides[d] == 0 ? 1 : grid.sizes[d]);
      strides.push_back(op.grid_strides[d]);
    }
    sizes.insert(sizes.end(), {rows, width});
    strides.insert(strides.end(), {op.row_stride, op.col_stride});
    std::vector<int64_t> padded_sizes = sizes;
    padded_sizes.back() = ceil_div(width, kChunkElements) * kChunkElements;
    int64_t numel = 1;
    for (int64_t size : padded_sizes) numel *= size;
    const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor staged = device_buffer(numel, dtype).zero_().view(padded_sizes);
    const at::Tensor source = at::from_blob(const_cast<void*>(op.data), sizes, strides, staged.options());
    staged.narrow(-1, 0, width).copy_(source);
    op.data = staged.const_data_ptr();
    for (int d = 0; d < grid.ndim; ++d) op.grid_strides[d] = op.grid_strides[d] == 0 ? 0 : staged.stride(d);
    op.row_stride = padded_sizes.back();
    op.col_stride = 1;
    buffers_.push_back(std::move(staged));
  }

  // Q, K and V of a call.
  template <typename scalar_t>
  void stage_inputs(AttentionParams& p) {
    stage<scalar_t>(p.query, p.grid, p.L, p.E);
    stage<scalar_t>(p.key, p.grid, p.S, p.E);
    stage<scalar_t>(p.value, p.grid, p.S, p.Ev);
  }

 private:
  std::vector<at::Tensor> buffers_;
};

}  // namespace mha_ext::cuda
