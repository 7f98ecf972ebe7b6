// The backward kernels for c10::BFloat16 inputs: one dtype per file keeps each nvcc job small.
#include "cuda/backward_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward<c10::BFloat16>(const AttentionGradParams&);
}  // namespace mha_ext::cuda
