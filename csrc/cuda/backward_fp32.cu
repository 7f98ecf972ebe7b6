// The backward kernels for float inputs: one dtype per file keeps each nvcc job small.
#include "cuda/backward_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward<float>(const AttentionGradParams&);
}  // namespace mha_ext::cuda
