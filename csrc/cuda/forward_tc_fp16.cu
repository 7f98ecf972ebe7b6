// The tensor-core forward for c10::Half inputs: one dtype per file keeps each nvcc job small.
#include "cuda/forward_tc_kernel.cuh"

namespace mha_ext::cuda {
template void run_forward_tensor_cores<c10::Half>(const AttentionParams&);
template std::string forward_tensor_cores_unavailable<c10::Half>(const AttentionParams&);
}  // namespace mha_ext::cuda
