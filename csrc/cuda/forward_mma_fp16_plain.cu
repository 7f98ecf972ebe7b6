// The tensor-core forward for c10::Half inputs, calls without masks, bias or dropout: one variant per file
// keeps each nvcc job small.
#include "cuda/forward_mma_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward_mma<c10::Half, false>(const AttentionParams&);
template std::string forward_mma_unavailable<c10::Half, false>(const AttentionParams&);
}  // namespace mha_ext::cuda
