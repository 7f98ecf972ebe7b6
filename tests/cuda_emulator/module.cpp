// Python module of the emulator: the CUDA backend (csrc/cuda, kernels run by the emulator on CPU tensors)
// put behind the CPU dispatch key of the ops on request, and small kernels that check the emulator itself.
// The ops' bodies (contract, entry, settings) are mha_ext._C's: this module links against it.
#include <torch/extension.h>

#include <memory>

#include "attention/register_backend.h"
#include "cuda/launch.h"
#include "cuda/launch_kernel.cuh"
#include "cuda/ptx.cuh"
#include "ptx.h"

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

at::Tensor self_check(const std::string& name) {
  at::Tensor out = at::zeros({kThreads});
  float* data = out.data_ptr<float>();
  const size_t floats = kThreads * sizeof(float);
  if (name == "shuffle_and_vote") launch_kernel(shuffle_and_vote_kernel, 1, 0, data);
  else if (name == "divergent_barrier") launch_kernel(divergent_barrier_kernel, 1, 0, data);
  else if (name == "unwritten_shared_read") launch_kernel(unwritten_shared_read_kernel, 1, floats, data);
  else if (name == "missing_barrier") launch_kernel(missing_barrier_kernel, 1, kWarpSize * sizeof(float), data);
  else if (name == "shared_overrun") launch_kernel(shared_overrun_kernel, 1, floats / 2, data);
  else TORCH_CHECK_VALUE(false, "no self-check named ", name);
  return out;
}

// Checks of the sm80 instructions (ptx.cpp): kernels of one block of kThreads threads, whose lanes put their
// operands into registers, or their addresses, as the PTX ISA lays them out, so that the tests can compare the
// results with what they work out from the same layouts.

// Every warp computes A B + C (A 16 x 16 and B 16 x 8, row-major 16-bit numbers; C 16 x 8) into its 16 x 8
// of `d`.
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d, bool bf16) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize, g = lane / 4, t = lane % 4;
  const auto pair = [](uint16_t low, uint16_t high) { return uint32_t{low} | uint32_t{high} << 16; };
  const auto at_a = [&](int row, int col) { return pair(a[row * 16 + col], a[row * 16 + col + 1]); };
  const auto at_b = [&](int k, int n) { return pair(b[k * 8 + n], b[(k + 1) * 8 + n]); };
  const uint32_t a_registers[4] = {at_a(g, 2 * t), at_a(g + 8, 2 * t), at_a(g, 2 * t + 8), at_a(g + 8, 2 * t + 8)};
  const uint32_t b_registers[2] = {at_b(2 * t, g), at_b(2 * t + 8, g)};
  float accumulators[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  ptx::mma_m16n8k16(accumulators, a_registers, b_registers, accumulators, bf16);
  float* out = d + threadIdx.x / kWarpSize * 16 * 8;
  out[g * 8 + 2 * t] = accumulators[0];
  out[g * 8 + 2 * t + 1] = accumulators[1];
  out[(g + 8) * 8 + 2 * t] = accumulators[2];
  out[(g + 8) * 8 + 2 * t + 1] = accumulators[3];
}

// Shared memory holds the 16-bit numbers 0, 1, 2, ...; lane j < 8 count of every warp gives the address of row
// j, `row_bytes` apart (the other lanes an address that ldmatrix ignores), and writes out its registers.
__global__ void ldmatrix_kernel(int32_t* out, int count, bool trans, int row_bytes) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  uint16_t* numbers = reinterpret_cast<uint16_t*>(shared_memory);
  for (int i = static_cast<int>(threadIdx.x); i < kWarpSize * row_bytes / 2; i += kThreads) numbers[i] = i;
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  uint32_t registers[4];
  ptx::ldmatrix(registers, count, trans, lane < 8 * count ? shared_memory + lane * row_bytes : nullptr);
  for (int i = 0; i < count; ++i) out[threadIdx.x * 8 + i] = static_cast<int32_t>(registers[i]);
}

// cp.async scenarios. In group k, thread t copies chunk 128 k + t (8 16-bit numbers) of `source` to chunk
// 128 k + t of shared memory, or zeros from chunk `source_chunks` on.
__device__ void copy_chunk(const uint16_t* source, int source_chunks, int group) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  const int chunk = kThreads * group + static_cast<int>(threadIdx.x);
  const bool in_bounds = chunk < source_chunks;
  ptx::cp_async_16(shared_memory + chunk * 16, source + (in_bounds ? chunk : 0) * 8, in_bounds);
}

// An ldmatrix.x4 of the 32 chunks that warp `warp` copied, lane j giving chunk j's address.
__device__ void load_chunks_of_warp(int32_t* out, int warp) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  uint32_t registers[4];
  ptx::ldmatrix_x4(registers, shared_memory + (warp * kWarpSize + static_cast<int>(threadIdx.x) % kWarpSize) * 16);
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 8 + i] = static_cast<int32_t>(registers[i]);
}

__device__ int32_t first_word_of_chunk(int chunk) {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  return reinterpret_cast<const int32_t*>(shared_memory)[chunk * 4];
}

// The right pattern: issue, commit, wait, __syncthreads, ldmatrix.
__global__ void cp_async_waited_kernel(const uint16_t* source, int source_chunks, int32_t* out) {
  copy_chunk(source, source_chunks, 0);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  load_chunks_of_warp(out, static_cast<int>(threadIdx.x) / kWarpSize);
}

__global__ void cp_async_not_waited_kernel(const uint16_t* source, int source_chunks, int32_t* out) {
  copy_chunk(source, source_chunks, 0);
  ptx::cp_async_commit();
  __syncthreads();
  load_chunks_of_warp(out, static_cast<int>(threadIdx.x) / kWarpSize);
  ptx::cp_async_wait<0>();
}

// Each warp but the first reads the chunks of the warp before it, which that warp's waits landed, with no
// __syncthreads between; warp 0 reads its own, which is allowed (each lane landed its own row).
__global__ void cp_async_without_barrier_kernel(const uint16_t* source, int source_chunks, int32_t* out) {
  copy_chunk(source, source_chunks, 0);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  load_chunks_of_warp(out, std::max(0, static_cast<int>(threadIdx.x) / kWarpSize - 1));
}

// Two committed groups, then an uncommitted copy: out[t][k] is the first word of a chunk of thread t (NaN bits
// where not landed) after wait<1> (groups 0 and 1), then wait<0> (groups 1 and 2: the third copy, not
// committed, stays in flight), then commit and wait<0> (group 2).
__global__ void cp_async_groups_kernel(const uint16_t* source, int source_chunks, int32_t* out) {
  const int t = static_cast<int>(threadIdx.x);
  for (int group = 0; group < 2; ++group) {
    copy_chunk(source, source_chunks, group);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<1>();
  __syncthreads();
  out[t * 8 + 0] = first_word_of_chunk(t);
  out[t * 8 + 1] = first_word_of_chunk(kThreads + t);
  copy_chunk(source, source_chunks, 2);
  ptx::cp_async_wait<0>();
  __syncthreads();
  out[t * 8 + 2] = first_word_of_chunk(kThreads + t);
  out[t * 8 + 3] = first_word_of_chunk(2 * kThreads + t);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  out[t * 8 + 4] = first_word_of_chunk(2 * kThreads + t);
}

// A second copy to the chunk of the first, before the first is waited for.
__global__ void cp_async_overlapping_kernel(const uint16_t* source, int source_chunks, int32_t*) {
  copy_chunk(source, source_chunks, 0);
  copy_chunk(source, source_chunks, 0);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
}

__global__ void cp_async_never_waited_kernel(const uint16_t* source, int source_chunks, int32_t*) {
  copy_chunk(source, source_chunks, 0);
  ptx::cp_async_commit();
}

// Every warp's D of check_mma's A (16 x 16, fp16 or bf16), B (16 x 8) and C (16 x 8, float).
at::Tensor check_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK_VALUE(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16, "A is fp16 or bf16");
  TORCH_CHECK_VALUE(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
                        c.sizes() == at::IntArrayRef({16, 8}) && b.scalar_type() == a.scalar_type() &&
                        c.scalar_type() == at::kFloat,
                    "A is 16 x 16, B 16 x 8 of A's type, C 16 x 8 float");
  const at::Tensor a16 = a.contiguous(), b16 = b.contiguous(), c32 = c.contiguous();
  at::Tensor d = at::empty({kWarps, 16, 8});
  launch_kernel(mma_kernel, 1, 0, static_cast<const uint16_t*>(a16.data_ptr()),
                static_cast<const uint16_t*>(b16.data_ptr()), c32.data_ptr<float>(), d.data_ptr<float>(),
                a.scalar_type() == at::kBFloat16);
  return d;
}

// Each thread's `count` registers of ldmatrix_kernel, in the first columns of kThreads x 8.
at::Tensor check_ldmatrix(int64_t count, bool trans, int64_t row_bytes) {
  at::Tensor out = at::zeros({kThreads, 8}, at::kInt);
  launch_kernel(ldmatrix_kernel, 1, kWarpSize * row_bytes, out.data_ptr<int32_t>(), static_cast<int>(count), trans,
                static_cast<int>(row_bytes));
  return out;
}

// One of the cp.async scenarios, with `source` (16-bit numbers, 8 a chunk); kThreads x 8 words out.
at::Tensor check_cp_async(const std::string& scenario, const at::Tensor& source) {
  TORCH_CHECK_VALUE(source.scalar_type() == at::kShort && source.is_contiguous() && source.numel() % 8 == 0,
                    "the source is contiguous int16, whole chunks of 8");
  at::Tensor out = at::zeros({kThreads, 8}, at::kInt);
  const auto run = [&](void (*kernel)(const uint16_t*, int, int32_t*)) {
    launch_kernel(kernel, 1, 3 * kThreads * 16, static_cast<const uint16_t*>(source.data_ptr()),
                  static_cast<int>(source.numel() / 8), out.data_ptr<int32_t>());
  };
  if (scenario == "waited") run(cp_async_waited_kernel);
  else if (scenario == "not_waited") run(cp_async_not_waited_kernel);
  else if (scenario == "without_barrier") run(cp_async_without_barrier_kernel);
  else if (scenario == "groups") run(cp_async_groups_kernel);
  else if (scenario == "overlapping") run(cp_async_overlapping_kernel);
  else if (scenario == "never_waited") run(cp_async_never_waited_kernel);
  else TORCH_CHECK_VALUE(false, "no cp.async scenario named ", scenario);
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
  m.def("check_mma", &check_mma, "Every warp's D = A B + C by ptx::mma_m16n8k16");
  m.def("check_ldmatrix", &check_ldmatrix, "Every thread's registers of ptx::ldmatrix over numbered rows");
  m.def("check_cp_async", &check_cp_async, "Runs a cp.async scenario");
  m.def("bank_conflicts", &mha_emu::bank_conflicts,
        "{site: (warp-wide accesses, extra wavefronts)} of ldmatrix and cp.async, since the last reset");
  m.def("reset_bank_conflicts", &mha_emu::reset_bank_conflicts, "Zeroes the bank-conflict counts");
}
