// The tensor-core backward for c10::BFloat16 inputs: one dtype per file keeps each nvcc job small.
#include "cuda/backward_tc_kernel.cuh"

namespace mha_ext::cuda {
template void run_backward_tensor_cores<c10::BFloat16>(const AttentionGradParams&);
template std::string backward_tensor_cores_unavailable<c10::BFloat16>(const AttentionParams&);
}  // namespace mha_ext::cuda
