// The CPU registrations of the ops: the device-independent bodies of csrc/attention/entry.cpp with the CPU
// kernels. The only CPU file that includes torch/library.h, so the kernel files compile without it.
#include <torch/library.h>

#include "attention/entry.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

TORCH_LIBRARY_IMPL(mha_ext, CPU, m) {
  using namespace mha_ext::cpu;
  m.impl("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                 c10::string_view causal, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& rng_state) {
    return mha_ext::attention_forward(q, k, v, mask, bias, causal, scale, dropout_p, rng_state, forward_cpu);
  });
  m.impl("attention_backward",
         [](const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, const at::Tensor& output,
            const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, c10::string_view causal, double scale,
            bool mask_requires_grad, bool bias_requires_grad, double dropout_p,
            const std::optional<at::Tensor>& rng_state) {
           return mha_ext::attention_backward(grad_output, q, k, v, mask, bias, output, lse, grad_lse, causal, scale,
                                              mask_requires_grad, bias_requires_grad, dropout_p, rng_state,
                                              backward_cpu, mha_ext::GradScoresLayout::kSharedWhereBroadcast,
                                              zeros_on_huge_pages);
         });
  m.impl("attention_weights", [](const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lse, c10::string_view causal,
                                 double scale) {
    return mha_ext::attention_weights(q, k, mask, bias, lse, causal, scale, weights_cpu);
  });
  m.impl("attention_dropout_mask",
         [](const at::Tensor& q, const at::Tensor& k, double dropout_p, const at::Tensor& rng_state) {
           return mha_ext::attention_dropout_mask(q, k, dropout_p, rng_state, dropout_mask_cpu);
         });
}
