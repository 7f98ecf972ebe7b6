// The weights kernels for double inputs: one dtype per file keeps each nvcc job small.
#include "cuda/weights_kernel.cuh"

namespace mha_ext::cuda {
template void run_weights<double>(const AttentionParams&, void*);
}  // namespace mha_ext::cuda
