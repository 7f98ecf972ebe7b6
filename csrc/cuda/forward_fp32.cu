// The forward kernels for float inputs: one dtype per file keeps each nvcc job small.
#include "cuda/forward_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward<float>(const AttentionParams&);
}  // namespace mha_ext::cuda
