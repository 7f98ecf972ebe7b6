// The CUDA registrations of the ops: the device-independent bodies of csrc/attention/entry.cpp with the
// CUDA kernels (dispatch.cpp), on the query's device and torch's current stream of it.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention/entry.h"
#include "cuda/launch.h"

namespace mha_ext::cuda {
namespace {

// The kernels hold whole rows of the head dims in shared memory.
void check_head_dim(const at::Tensor& t, const char* what) {
  if (t.dim() < 1) return;  // the contract reports the missing dims
  TORCH_CHECK_VALUE(t.size(-1) <= kMaxHeadDim, "mha_ext: on CUDA, ", what, " (last dim) must be at most ",
                    kMaxHeadDim, ", got ", t.size(-1));
}

// The device to run on: the query's when it is a CUDA tensor; otherwise none, and the contract reports
// the device mismatch naming the argument.
std::optional<c10::Device> cuda_device_of(const at::Tensor& query) {
  return query.is_cuda() ? std::optional<c10::Device>(query.device()) : std::nullopt;
}

}  // namespace
}  // namespace mha_ext::cuda

TORCH_LIBRARY_IMPL(mha_ext, CUDA, m) {
  using namespace mha_ext::cuda;
  m.impl("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                 c10::string_view causal, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& rng_state) {
    check_head_dim(q, "query's head dim E");
    check_head_dim(v, "value's head dim Ev");
    const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(q));
    return mha_ext::attention_forward(q, k, v, mask, bias, causal, scale, dropout_p, rng_state, dispatch_forward);
  });
  m.impl("attention_backward",
         [](const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, const at::Tensor& output,
            const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, c10::string_view causal, double scale,
            bool mask_requires_grad, bool bias_requires_grad, double dropout_p,
            const std::optional<at::Tensor>& rng_state) {
           check_head_dim(q, "query's head dim E");
           check_head_dim(v, "value's head dim Ev");
           const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(q));
           return mha_ext::attention_backward(grad_output, q, k, v, mask, bias, output, lse, grad_lse, causal,
                                              scale, mask_requires_grad, bias_requires_grad, dropout_p, rng_state,
                                              dispatch_backward, mha_ext::GradScoresLayout::kPerBatchHead);
         });
  m.impl("attention_weights", [](const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lse, c10::string_view causal,
                                 double scale) {
    check_head_dim(q, "query's head dim E");
    const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(q));
    return mha_ext::attention_weights(q, k, mask, bias, lse, causal, scale, dispatch_weights);
  });
  m.impl("attention_dropout_mask",
         [](const at::Tensor& q, const at::Tensor& k, double dropout_p, const at::Tensor& rng_state) {
           const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(q));
           return mha_ext::attention_dropout_mask(q, k, dropout_p, rng_state, run_dropout_mask);
         });
}
