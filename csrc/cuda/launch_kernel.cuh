// Host side of every launch: shared-memory opt-in, grid size, torch's current stream, launch check.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/kernel_traits.cuh"

namespace mha_ext::cuda {

// Launches `kernel` over `items` independent work items with kThreads threads per block. The kernels
// loop over items with a grid stride, so any item count (batch-heads beyond 65535, or beyond 2^31
// blocks) is covered; a launch with no items is skipped (a zero-sized grid is a launch error).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), int64_t items, size_t smem_bytes, const Args&... args) {
  if (items <= 0) return;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem_bytes <= props->sharedMemPerBlockOptin, "mha_ext: this CUDA kernel needs ", smem_bytes,
              " bytes of shared memory per block, but ", props->name, " allows at most ",
              props->sharedMemPerBlockOptin);
  if (smem_bytes > props->sharedMemPerBlock) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>(items, std::numeric_limits<int>::max()));
  kernel<<<blocks, kThreads, smem_bytes, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mha_ext::cuda
