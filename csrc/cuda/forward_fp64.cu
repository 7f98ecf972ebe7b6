// The forward kernels for double inputs: one dtype per file keeps each nvcc job small.
#include "cuda/forward_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward<double>(const AttentionParams&);
}  // namespace mha_ext::cuda
