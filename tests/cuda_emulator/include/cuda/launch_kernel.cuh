// Stands in for csrc/cuda/launch_kernel.cuh when the emulator compiles the kernels (this directory comes
// first on the include path): the same interface, with launches run on the CPU by emulator.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/kernel_traits.cuh"

namespace mha_ext::cuda {

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), int64_t items, size_t smem_bytes, const Args&... args) {
  if (items <= 0) return;
  TORCH_CHECK(smem_bytes <= ::mha_emu::max_shared_bytes(), "mha_ext: this CUDA kernel needs ", smem_bytes,
              " bytes of shared memory per block, but the emulated GPU allows at most ", ::mha_emu::max_shared_bytes());
  ::mha_emu::launch(std::min(items, ::mha_emu::max_blocks()), kThreads, smem_bytes, [&] { kernel(args...); });
}

inline bool shared_memory_fits(size_t smem_bytes) { return smem_bytes <= ::mha_emu::max_shared_bytes(); }

// The emulator compiles every kernel body.
template <typename Kernel>
bool has_sm80_image(Kernel*) {
  return true;
}

inline std::string device_description() {
  return "the CPU emulator of the tests (tests/cuda_emulator), " + std::to_string(::mha_emu::max_shared_bytes() / 1024) +
         " KiB of shared memory per block";
}

inline at::Tensor device_buffer(int64_t numel, at::ScalarType dtype) { return at::empty({numel}, at::dtype(dtype)); }

}  // namespace mha_ext::cuda
