// The forward kernels for c10::Half inputs: one dtype per file keeps each nvcc job small.
#include "cuda/forward_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward<c10::Half>(const AttentionParams&);
}  // namespace mha_ext::cuda
