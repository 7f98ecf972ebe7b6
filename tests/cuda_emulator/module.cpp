// Python module of the emulator: the ops' device-independent bodies (csrc/attention/entry.cpp) with the
// CUDA kernels run by the emulator, taking CPU tensors; and small kernels that check the emulator itself.
#include <torch/extension.h>

#include <mma.h>

#include "attention/entry.h"
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

}  // namespace mha_ext::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mha_ext::cuda;
  // py::arg defaults: the schemas' defaults, which the dispatcher does not fill in for a Python kernel.
  m.def("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                c10::string_view causal, double scale, double dropout_p,
                                const std::optional<at::Tensor>& rng_state) {
    return mha_ext::attention_forward(q, k, v, mask, bias, causal, scale, dropout_p, rng_state, dispatch_forward);
  }, py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_mask"), py::arg("attn_bias"),
        py::arg("causal"), py::arg("scale"), py::arg("dropout_p") = 0.0, py::arg("rng_state") = py::none());
  m.def("attention_backward",
        [](const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, const at::Tensor& output,
           const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, c10::string_view causal, double scale,
           bool mask_requires_grad, bool bias_requires_grad, double dropout_p,
           const std::optional<at::Tensor>& rng_state) {
          return mha_ext::attention_backward(grad_output, q, k, v, mask, bias, output, lse, grad_lse, causal, scale,
                                             mask_requires_grad, bias_requires_grad, dropout_p, rng_state,
                                             dispatch_backward, mha_ext::GradScoresLayout::kPerBatchHead);
        },
        py::arg("grad_output"), py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_mask"),
        py::arg("attn_bias"), py::arg("output"), py::arg("lse"), py::arg("grad_lse"), py::arg("causal"),
        py::arg("scale"), py::arg("mask_requires_grad"), py::arg("bias_requires_grad"), py::arg("dropout_p") = 0.0,
        py::arg("rng_state") = py::none());
  m.def("attention_weights", [](const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lse, c10::string_view causal,
                                double scale) {
    return mha_ext::attention_weights(q, k, mask, bias, lse, causal, scale, dispatch_weights);
  });
  m.def("attention_dropout_mask", [](const at::Tensor& q, const at::Tensor& k, double dropout_p,
                                     const at::Tensor& rng_state) {
    return mha_ext::attention_dropout_mask(q, k, dropout_p, rng_state, run_dropout_mask);
  });
  m.def("self_check", &self_check, "Runs one of the emulator's own check kernels");
  m.def("launches", &mha_emu::launches, "Kernel launches emulated so far");
}
