// The tensor-core backward for c10::BFloat16 inputs, calls without masks, bias or dropout: one variant per file
// keeps each nvcc job small.
#include "cuda/backward_mma_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward_mma<c10::BFloat16, false>(const AttentionGradParams&);
template std::string backward_mma_unavailable<c10::BFloat16, false>(const AttentionParams&);
}  // namespace mha_ext::cuda
