// The backward kernels for c10::Half inputs: one dtype per file keeps each nvcc job small.
#include "cuda/backward_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward<c10::Half>(const AttentionGradParams&);
}  // namespace mha_ext::cuda
