// The CPU backend: its kernels bound to the ops. The only CPU file that includes torch/library.h, so the
// kernel files compile without it.
#include "attention/register_backend.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace mha_ext::cpu {
namespace {

constexpr Backend kCpuBackend{"cpu",       forward_cpu, backward_cpu, weights_cpu,
                              dropout_mask_cpu, explain_cpu, GradScoresLayout::kSharedWhereBroadcast,
                              zeros_on_huge_pages, /*max_head_dim=*/0};

}  // namespace
}  // namespace mha_ext::cpu

TORCH_LIBRARY_IMPL(mha_ext, CPU, m) { mha_ext::register_backend<mha_ext::cpu::kCpuBackend>(m); }
