// Host side of every launch: shared-memory opt-in, grid size, torch's current stream, launch check; the
// architecture of a kernel's image; scratch buffers. tests/cuda_emulator/include/cuda/launch_kernel.cuh
// stands in for this file when the tests run the kernels on the CPU, and mirrors its interface.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

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

// Whether the current device lets a block have `smem_bytes` of dynamic shared memory (its opt-in limit).
inline bool shared_memory_fits(size_t smem_bytes) {
  return smem_bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Whether the image of `kernel` that runs on the current device was compiled for sm80 or newer. A build
// without such a target (TORCH_CUDA_ARCH_LIST="7.5", or 7.5 PTX JIT-compiled for a newer GPU) holds only
// the empty body; a device the build has no image for at all is left to the CUDA-core kernel's launch to
// report.
template <typename Kernel>
bool has_sm80_image(Kernel* kernel) {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so that it is not taken for the next launch's error
    return false;
  }
  return attributes.ptxVersion >= 80;
}

// The current device as explain() names it: model, compute capability, shared memory a block may opt into.
inline std::string device_description() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return std::string(props->name) + ", sm" + std::to_string(props->major) + std::to_string(props->minor) + ", " +
         std::to_string(props->sharedMemPerBlockOptin / 1024) + " KiB of shared memory per block";
}

// An uninitialised buffer of `numel` elements of `dtype` on the current device, freed with the tensor
// (through torch's caching allocator, in stream order).
inline at::Tensor device_buffer(int64_t numel, at::ScalarType dtype) {
  return at::empty({numel}, at::TensorOptions().dtype(dtype).device(at::kCUDA, c10::cuda::current_device()));
}

}  // namespace mha_ext::cuda
