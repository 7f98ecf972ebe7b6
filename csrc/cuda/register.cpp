// The CUDA backend (dispatch.cpp) bound to the ops: each call runs on its tensors' device and torch's current
// stream of it.
#include "attention/register_backend.h"
#include "cuda/launch.h"

TORCH_LIBRARY_IMPL(mha_ext, CUDA, m) { mha_ext::register_backend<mha_ext::cuda::kCudaBackend>(m); }
