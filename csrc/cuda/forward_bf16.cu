// The forward kernels for c10::BFloat16 inputs: one dtype per file keeps each nvcc job small.
#include "cuda/forward_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward<c10::BFloat16>(const AttentionParams&);
}  // namespace mha_ext::cuda
