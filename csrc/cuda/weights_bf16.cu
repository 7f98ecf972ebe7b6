// The weights kernels for c10::BFloat16 inputs: one dtype per file keeps each nvcc job small.
#include "cuda/weights_kernel.cuh"

namespace mha_ext::cuda {
template void run_weights<c10::BFloat16>(const AttentionParams&, void*);
}  // namespace mha_ext::cuda
