// Which kernel runs each op for a runtime input dtype. Plain C++, kept apart from register.cpp so that the
// CPU emulator of the tests (tests/cuda_emulator) runs the same choice.
#include "attention/settings.h"
#include "cuda/launch.h"
#include "cuda/static_switch.h"

namespace mha_ext::cuda {

std::string tensor_cores_unavailable(bool backward, const AttentionParams& p, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return "tensor cores take float16 and bfloat16 inputs; float32 and float64 run on CUDA cores in their own "
           "precision";
  }
  // Setting cuda_tensor_cores "off" keeps fp16/bf16 on the CUDA-core kernels, to compare the two paths.
  if (!kernel_settings().cuda_tensor_cores) return "setting cuda_tensor_cores is off";
  return MHA_BOOL_SWITCH(scores_need_masking(p), kMasked, [&] {
    if (backward) {
      return dtype == at::kHalf ? backward_mma_unavailable<c10::Half, kMasked>(p)
                                : backward_mma_unavailable<c10::BFloat16, kMasked>(p);
    }
    return dtype == at::kHalf ? forward_mma_unavailable<c10::Half, kMasked>(p)
                              : forward_mma_unavailable<c10::BFloat16, kMasked>(p);
  });
}

// fp16/bf16 run on tensor cores where they can (a build with an sm80+ image, on an sm80+ part), the rest on
// CUDA cores.
void dispatch_forward(const AttentionParams& p, at::ScalarType dtype) {
  if (tensor_cores_unavailable(/*backward=*/false, p, dtype).empty()) {
    MHA_BOOL_SWITCH(scores_need_masking(p), kMasked, [&] {
      dtype == at::kHalf ? run_forward_mma<c10::Half, kMasked>(p) : run_forward_mma<c10::BFloat16, kMasked>(p);
    });
    return;
  }
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_forward<scalar_t>(p); });
}

void dispatch_backward(const AttentionGradParams& g, at::ScalarType dtype) {
  if (tensor_cores_unavailable(/*backward=*/true, g.fwd, dtype).empty()) {
    MHA_BOOL_SWITCH(scores_need_masking(g.fwd), kMasked, [&] {
      dtype == at::kHalf ? run_backward_mma<c10::Half, kMasked>(g) : run_backward_mma<c10::BFloat16, kMasked>(g);
    });
    return;
  }
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_backward<scalar_t>(g); });
}

void dispatch_weights(const AttentionParams& p, at::ScalarType dtype, void* weights) {
  MHA_DTYPE_SWITCH(dtype, scalar_t, [&] { run_weights<scalar_t>(p, weights); });
}

const Backend kCudaBackend{"cuda",      dispatch_forward, dispatch_backward, dispatch_weights,
                           run_dropout_mask, explain_cuda, GradScoresLayout::kPerBatchHead,
                           /*grad_scores_zeros=*/nullptr, kMaxHeadDim};

}  // namespace mha_ext::cuda
