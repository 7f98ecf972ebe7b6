// Python module of the emulator: the CUDA backend (csrc/cuda, kernels run by the emulator on CPU tensors)
// put behind the CPU dispatch key of the ops on request, and small kernels that check the emulator itself.
// The ops' bodies (contract, entry, settings) are mha_ext._C's: this module links against it.
#include <torch/extension.h>

#include <mma.h>

#include <memory>

#include "attention/register_backend.h"
#include "cuda/launch.h"
#include "cuda/launch_kernel.cuh"

// Not in an anonymous namespace: their `extern __shared__` must name mha_ext::cuda::shared_memory.
namespace mha_ext::cuda {

// Self-checks: each launches one block of kThreads threads writing kThreads floats to `out`.
__global__ void shuffle_and_vote_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  const int partner = __shfl_xor_sync(0xffffffffu, t, 5);
  const int any_large = __syncthreads_or(t == kThreads - 1);
  const int none = __syncthreads_or(0);
  out[t] = static_cast<float>(partner * 4 + any_large * 2 + none);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void unwritten_shared_read_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  out[threadIdx.x] = reinterpret_cast<float*>(shared_memory)[threadIdx.x];
}

// Warp 0 reads what the last warp writes, with no __syncthreads between: unwritten when warp 0 runs first.
__global__ void missing_barrier_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  float* shared = reinterpret_cast<float*>(shared_memory);
  const int t = static_cast<int>(threadIdx.x);
  if (t >= kThreads - kWarpSize) shared[t - (kThreads - kWarpSize)] = 1.f;
  out[t] = t < kWarpSize ? shared[t] : 1.f;
}

__global__ void shared_overrun_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  reinterpret_cast<float*>(shared_memory)[threadIdx.x] = 0.f;  // launched with half of this
  out[threadIdx.x] = 0.f;
}

__global__ void misaligned_wmma_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fill_fragment(acc, 0.f);
  nvcuda::wmma::store_matrix_sync(reinterpret_cast<float*>(shared_memory) + 4, acc, 16, nvcuda::wmma::mem_row_major);
  out[threadIdx.x] = 0.f;
}

// Each warp's lane 1 loads from 16 floats further on than the others.
__global__ void divergent_wmma_pointer_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  const float* tile = reinterpret_cast<float*>(shared_memory) + (threadIdx.x % kWarpSize == 1 ? 16 : 0);
  nvcuda::wmma::load_matrix_sync(acc, tile, 16, nvcuda::wmma::mem_row_major);
  out[threadIdx.x] = 0.f;
}

at::Tensor self_check(const std::string& name) {
  at::Tensor out = at::zeros({kThreads});
  float* data = out.data_ptr<float>();
  const size_t floats = kThreads * sizeof(float);
  if (name == "shuffle_and_vote") launch_kernel(shuffle_and_vote_kernel, 1, 0, data);
  else if (name == "divergent_barrier") launch_kernel(divergent_barrier_kernel, 1, 0, data);
  else if (name == "unwritten_shared_read") launch_kernel(unwritten_shared_read_kernel, 1, floats, data);
  else if (name == "missing_barrier") launch_kernel(missing_barrier_kernel, 1, kWarpSize * sizeof(float), data);
  else if (name == "shared_overrun") launch_kernel(shared_overrun_kernel, 1, floats / 2, data);
  else if (name == "misaligned_wmma") launch_kernel(misaligned_wmma_kernel, 1, 16 * 16 * sizeof(float) + 16, data);
  else if (name == "divergent_wmma_pointer")
    launch_kernel(divergent_wmma_pointer_kernel, 1, 17 * 16 * sizeof(float), data);
  else TORCH_CHECK_VALUE(false, "no self-check named ", name);
  return out;
}

// The emulated kernels behind the CPU dispatch key of the ops while alive: the CUDA backend bound by the
// same register_backend as on a GPU. Destroying the library restores the CPU kernels.
class CpuOverride {
 public:
  CpuOverride()
      : library_(std::make_unique<torch::Library>(torch::Library::IMPL, "mha_ext", c10::DispatchKey::CPU, __FILE__,
                                                  __LINE__)) {
    mha_ext::register_backend<kCudaBackend>(*library_);
  }
  void close() { library_.reset(); }

 private:
  std::unique_ptr<torch::Library> library_;
};

}  // namespace mha_ext::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mha_ext::cuda;
  py::class_<CpuOverride>(m, "CpuOverride").def(py::init<>()).def("close", &CpuOverride::close);
  m.def("self_check", &self_check, "Runs one of the emulator's own check kernels");
  m.def("launches", &mha_emu::launches, "Kernel launches emulated so far");
}
