// The CUDA language as the kernels use it, for compiling them as host code (MHA_EXT_CUDA_EMULATOR): the
// keywords, the built-in indices and the block- and warp-level primitives, which run on the fibers of
// emulator.cpp. Force-included into every kernel file (g++ -include cuda_runtime.h), as nvcc does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

namespace mha_emu {

struct Index3 {
  unsigned int x = 0, y = 0, z = 0;
};

// The running fiber's indices; the scheduler sets them before it resumes a fiber.
extern Index3 thread_index, block_index, block_dim, grid_dim;

// Blocks until every live thread of the block has arrived. Returns whether any of them passed a non-zero
// `predicate` (for __syncthreads_or).
int block_barrier(int predicate);
// Blocks until every live lane of the calling thread's warp has arrived at a warp barrier of the same
// `site` (their convergence is checked, as the _sync primitives require). Each lane passes `bits` and the
// lane whose bits it wants back (itself where nothing is exchanged).
uint64_t warp_barrier(const char* site, unsigned int mask, uint64_t bits, int source_lane);
// A warp-wide instruction (ptx.cpp): given each lane's input and output, in lane order, it does the whole
// warp's work at once. It runs outside the fibers, so it reports a broken rule by throwing.
using WarpCollective = void (*)(const void* const* inputs, void* const* outputs);
// Blocks until all 32 lanes of the calling thread's warp have arrived at the same `site` (checked as for a
// warp barrier), then calls `collective` once with every lane's `input` and `output` (which may point into
// the lanes' stacks: they wait meanwhile), then lets the lanes go on.
void warp_collective(const char* site, WarpCollective collective, const void* input, void* output);
// Stops the kernel with `message`; the launch then throws it.
[[noreturn]] void fail(const char* message);

// Runs `body` on every thread of `blocks` blocks of `threads` threads, one block after another, with
// `shared_bytes` of dynamic shared memory filled with 0xff (NaN as floats, so reads of unwritten shared
// memory show in the results). Throws what a kernel failed with, a deadlock, or a write past shared_bytes.
void launch(int64_t blocks, int threads, size_t shared_bytes, const std::function<void()>& body);
// Launches run so far (to check that the emulated kernels are the ones that ran).
int64_t launches();
// At most this many blocks per launch (MHA_EXT_EMULATOR_MAX_BLOCKS, default 3), so that the kernels' grid-
// stride loops run.
int64_t max_blocks();
// The most dynamic shared memory an emulated launch may ask for: an H100's opt-in maximum.
constexpr size_t kMaxSharedBytes = 227 * 1024;
// The emulated GPU's opt-in limit: kMaxSharedBytes, or MHA_EXT_EMULATOR_SHARED_BYTES (at most that), to
// stand in for a part with less (99 KiB: sm86/sm89).
size_t max_shared_bytes();

}  // namespace mha_emu

#define threadIdx (::mha_emu::thread_index)
#define blockIdx (::mha_emu::block_index)
#define blockDim (::mha_emu::block_dim)
#define gridDim (::mha_emu::grid_dim)

inline void __syncthreads() { ::mha_emu::block_barrier(0); }
inline int __syncthreads_or(int predicate) { return ::mha_emu::block_barrier(predicate); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::mha_emu::warp_barrier("__syncwarp", mask, 0, 0); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  if (width != 32) ::mha_emu::fail("__shfl_xor_sync: the emulator takes width 32 only");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = static_cast<int>(threadIdx.x % 32);
  bits = ::mha_emu::warp_barrier("__shfl_xor_sync", mask, bits, lane ^ lane_mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}
