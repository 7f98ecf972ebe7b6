// Whether a tensor-core kernel can launch on the current device, shared by the forward and the backward:
// what dispatch.cpp and explain.cu report when it cannot.
#pragma once

#include <string>

#include "cuda/launch_kernel.cuh"

namespace mha_ext::cuda {

// Why a tensor-core kernel that needs `smem_bytes` of shared memory per block cannot launch on the current
// device, in words; empty where it can.
template <typename Kernel>
std::string tensor_core_launch_unavailable(Kernel* kernel, size_t smem_bytes) {
  if (!has_sm80_image(kernel)) return "this build has no sm80-or-newer image of it for this device (TORCH_CUDA_ARCH_LIST)";
  if (!shared_memory_fits(smem_bytes)) {
    return "its tiles need " + std::to_string((smem_bytes + 1023) / 1024) +
           " KiB of shared memory per block, more than this device allows";
  }
  return "";
}

}  // namespace mha_ext::cuda
