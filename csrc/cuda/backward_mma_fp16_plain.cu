// The tensor-core backward for c10::Half inputs, calls without masks, bias or dropout: one variant per file
// keeps each nvcc job small.
#include "cuda/backward_mma_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward_mma<c10::Half, false>(const AttentionGradParams&);
template std::string backward_mma_unavailable<c10::Half, false>(const AttentionParams&);
}  // namespace mha_ext::cuda
