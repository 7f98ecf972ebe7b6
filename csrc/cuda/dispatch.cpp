// Which kernel runs each op for a runtime input dtype. Plain C++, kept apart from register.cpp so that the
// CPU emulator of the tests (tests/cuda_emulator) runs the same choice.
#include <cstdlib>
#include <cstring>

#include "cuda/launch.h"
#include "cuda/static_switch.h"

namespace mha_ext::cuda {
namespace {

// MHA_EXT_CUDA_TENSOR_CORES=0 keeps fp16/bf16 on the CUDA-core kernels, to compare the two paths.
bool tensor_cores_allowed() {
  const char* value = std::getenv("MHA_EXT_CUDA_TENSOR_CORES");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace

// fp16/bf16 run on tensor cores where try_forward_tensor_cores / try_backward_tensor_cores can (sm80+; E
// and Ev <= 128, or <= 256 on parts with 163 KiB of shared memory per block), the rest on CUDA cores.
void dispatch_forward(const AttentionParams& p, at::ScalarType dtype) {
  if (tensor_cores_allowed()) {
    if (dtype == at::kHalf && try_forward_tensor_cores<c10::Half>(p)) return;
    if (dtype == at::kBFloat16 && try_forward_tensor_cores<c10::BFloat16>(p)) return;
  }
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_forward<scalar_t>(p); });
}

void dispatch_backward(const AttentionGradParams& g, at::ScalarType dtype) {
  if (tensor_cores_allowed()) {
    if (dtype == at::kHalf && try_backward_tensor_cores<c10::Half>(g)) return;
    if (dtype == at::kBFloat16 && try_backward_tensor_cores<c10::BFloat16>(g)) return;
  }
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_backward<scalar_t>(g); });
}

void dispatch_weights(const AttentionParams& p, at::ScalarType dtype, void* weights) {
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_weights<scalar_t>(p, weights); });
}

}  // namespace mha_ext::cuda
