// Runs emulated kernel launches on the CPU. Each CUDA thread of a block is a fiber that runs until it
// reaches a barrier. A warp goes on once all its lanes wait at the same warp barrier (the _sync primitives)
// or warp collective (ptx.cpp's instructions, which also follow the block through ptx.h), the block once
// every thread waits at __syncthreads; anything else is a deadlock, and is reported. A
// barrier that a thread of its scope has exited past counts as one too: the kernels keep every thread to
// the end. Blocks run one after another on the calling thread, so runs are deterministic.
//
// Fibers start with makecontext/swapcontext and then switch with _setjmp/_longjmp, which unlike swapcontext
// make no system call (a signal mask) per switch; fortified builds would refuse a longjmp to another stack.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "ptx.h"

namespace mha_emu {
namespace {
// Checked after each block: a kernel that writes past its dynamic shared memory changes these bytes.
constexpr size_t kGuardBytes = 4096;
}  // namespace
}  // namespace mha_emu

namespace mha_ext::cuda {
// What the kernels declare as `extern __shared__ unsigned char shared_memory[]`.
alignas(128) unsigned char shared_memory[mha_emu::kMaxSharedBytes + mha_emu::kGuardBytes];
}  // namespace mha_ext::cuda

namespace mha_emu {

Index3 thread_index, block_index, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarpSize = 32;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false;
  Wait wait = Wait::kNone;
  const char* site = nullptr;
  uint64_t bits = 0;
  int source_lane = 0;
  uint64_t result = 0;
  WarpCollective collective = nullptr;  // at a warp collective: its function and this lane's operands
  const void* input = nullptr;
  void* output = nullptr;
};

struct Scheduler {
  jmp_buf resume;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stack_stride = 0;
  int stack_count = 0;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
};

Scheduler scheduler;
std::mutex launch_mutex;
int64_t launch_count = 0;

Fiber& self() { return scheduler.fibers[scheduler.current]; }

void suspend(Wait wait) {
  Fiber& f = self();
  f.wait = wait;
  if (_setjmp(f.resume) == 0) _longjmp(scheduler.resume, 1);
}

[[noreturn]] void fiber_main() {
  try {
    (*scheduler.body)();
  } catch (const std::exception& e) {
    if (scheduler.error.empty()) scheduler.error = e.what();
  }
  self().wait = Wait::kDone;
  _longjmp(scheduler.resume, 1);
}

void resume(int t) {
  Fiber& f = scheduler.fibers[t];
  scheduler.current = t;
  thread_index.x = static_cast<unsigned int>(t);
  if (_setjmp(scheduler.resume) != 0) return;  // the fiber suspended, exited or failed
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  ucontext_t unused;
  swapcontext(&unused, &f.start);
}

// Stacks with an inaccessible page below each, so that an overflow faults instead of corrupting a neighbour.
void reserve_stacks(int threads) {
  if (scheduler.stack_count >= threads) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t stride = kStackBytes + page;
  void* memory = mmap(nullptr, stride * threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  TORCH_CHECK(memory != MAP_FAILED, "cuda emulator: cannot map ", threads, " fiber stacks");
  for (int t = 0; t < threads; ++t) mprotect(static_cast<char*>(memory) + t * stride, page, PROT_NONE);
  if (scheduler.stacks != nullptr) munmap(scheduler.stacks, scheduler.stack_stride * scheduler.stack_count);
  scheduler.stacks = static_cast<char*>(memory);
  scheduler.stack_stride = stride;
  scheduler.stack_count = threads;
}

// Where each warp's threads wait, as runs of lanes: "warp 1: lanes 0-15 __syncthreads, lanes 16-31 exited".
std::string describe_waits(int threads) {
  const auto where = [](const Fiber& f) { return std::string(f.wait == Wait::kDone ? "exited" : f.site); };
  std::ostringstream out;
  for (int w0 = 0; w0 < threads; w0 += kWarpSize) {
    const int w1 = std::min(threads, w0 + kWarpSize);
    out << "\n  warp " << w0 / kWarpSize << ":";
    for (int run = w0; run < w1;) {
      int end = run + 1;
      while (end < w1 && where(scheduler.fibers[end]) == where(scheduler.fibers[run])) ++end;
      out << (run == w0 ? " " : ", ") << "lanes " << run - w0 << "-" << end - 1 - w0 << " "
          << where(scheduler.fibers[run]);
      run = end;
    }
  }
  return out.str();
}

// Runs a warp collective that all lanes [w0, w1) of a warp wait at.
void run_collective(int w0, int w1) {
  const Fiber& first = scheduler.fibers[w0];
  TORCH_CHECK(w1 - w0 == kWarpSize, "cuda emulator: ", first.site, " in block ", block_index.x,
              " takes a whole warp of ", kWarpSize, " lanes, not ", w1 - w0);
  const void* inputs[kWarpSize];
  void* outputs[kWarpSize];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    inputs[lane] = scheduler.fibers[w0 + lane].input;
    outputs[lane] = scheduler.fibers[w0 + lane].output;
  }
  first.collective(inputs, outputs);
}

// Lets the lanes [w0, w1) of a warp go on if they all wait at the same warp barrier or collective; false
// otherwise.
bool release_warp(int w0, int w1) {
  const Fiber& first = scheduler.fibers[w0];
  for (int t = w0; t < w1; ++t) {
    const Fiber& f = scheduler.fibers[t];
    if (f.wait != Wait::kWarp || std::strcmp(f.site, first.site) != 0 || f.collective != first.collective)
      return false;
  }
  if (first.collective != nullptr) {
    run_collective(w0, w1);
    for (int t = w0; t < w1; ++t) scheduler.fibers[t].wait = Wait::kNone;
    return true;
  }
  for (int t = w0; t < w1; ++t) {
    Fiber& f = scheduler.fibers[t];
    const int source = w0 + f.source_lane;
    TORCH_CHECK(f.source_lane >= 0 && source < w1, "cuda emulator: ", f.site, " in block ", block_index.x,
                " reads lane ", f.source_lane, ", outside its warp");
    f.result = scheduler.fibers[source].bits;
  }
  for (int t = w0; t < w1; ++t) scheduler.fibers[t].wait = Wait::kNone;
  return true;
}

// Lets the block go on if every thread waits at __syncthreads; false otherwise.
bool release_block(int threads) {
  uint64_t any = 0;
  for (int t = 0; t < threads; ++t) {
    const Fiber& f = scheduler.fibers[t];
    if (f.wait != Wait::kBlock) return false;
    any |= f.bits;
  }
  for (int t = 0; t < threads; ++t) {
    scheduler.fibers[t].result = any;
    scheduler.fibers[t].wait = Wait::kNone;
  }
  publish_async_copies();
  return true;
}

// Runs a warp's lanes, through its warp barriers, until it waits for the rest of the block (or is done).
void run_warp(int w0, int w1) {
  do {
    for (int t = w0; t < w1; ++t) {
      if (scheduler.fibers[t].wait != Wait::kNone) continue;
      resume(t);
      TORCH_CHECK(scheduler.error.empty(), "cuda emulator: block ", block_index.x, ", thread ", t, ": ",
                  scheduler.error);
    }
  } while (release_warp(w0, w1));
}

// The warps run one at a time, each as far as it can get before a __syncthreads, first to last or (with
// MHA_EXT_EMULATOR_WARP_ORDER=reverse) last to first: a warp that reads what another warp writes without
// a barrier between them reads it unwritten (NaN on a block's first item) in one of the two orders.
bool warps_in_reverse() {
  const char* order = std::getenv("MHA_EXT_EMULATOR_WARP_ORDER");
  return order != nullptr && std::strcmp(order, "reverse") == 0;
}

void run_block(int threads) {
  scheduler.fibers.assign(threads, Fiber{});
  for (int t = 0; t < threads; ++t) {
    Fiber& f = scheduler.fibers[t];
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = scheduler.stacks + t * scheduler.stack_stride + (scheduler.stack_stride - kStackBytes);
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.start, fiber_main, 0);
  }
  const bool reverse = warps_in_reverse();
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  for (;;) {
    for (int i = 0; i < warps; ++i) {
      const int w = reverse ? warps - 1 - i : i;
      run_warp(w * kWarpSize, std::min(threads, (w + 1) * kWarpSize));
    }
    bool all_done = true;
    for (const Fiber& f : scheduler.fibers) all_done = all_done && f.wait == Wait::kDone;
    if (all_done) return;
    TORCH_CHECK(release_block(threads), "cuda emulator: deadlock in block ", block_index.x,
                " (a barrier that not every thread of its scope reaches):", describe_waits(threads));
  }
}

}  // namespace

int block_barrier(int predicate) {
  Fiber& f = self();
  f.site = "__syncthreads";
  f.bits = predicate != 0;
  suspend(Wait::kBlock);
  return static_cast<int>(f.result);
}

uint64_t warp_barrier(const char* site, unsigned int mask, uint64_t bits, int source_lane) {
  if (mask != 0xffffffffu) fail("partial warp masks are not emulated");
  Fiber& f = self();
  f.site = site;
  f.bits = bits;
  f.source_lane = source_lane;
  f.collective = nullptr;
  suspend(Wait::kWarp);
  return f.result;
}

void warp_collective(const char* site, WarpCollective collective, const void* input, void* output) {
  Fiber& f = self();
  f.site = site;
  f.collective = collective;
  f.input = input;
  f.output = output;
  suspend(Wait::kWarp);
}

void fail(const char* message) {
  if (scheduler.error.empty()) scheduler.error = message;
  self().wait = Wait::kDone;
  _longjmp(scheduler.resume, 1);  // the scheduler never resumes a failed fiber
}

int64_t launches() { return launch_count; }

size_t max_shared_bytes() {
  const char* value = std::getenv("MHA_EXT_EMULATOR_SHARED_BYTES");
  return value != nullptr ? std::min<size_t>(kMaxSharedBytes, std::strtoull(value, nullptr, 10)) : kMaxSharedBytes;
}

int64_t max_blocks() {
  const char* value = std::getenv("MHA_EXT_EMULATOR_MAX_BLOCKS");
  return value != nullptr ? std::max<int64_t>(1, std::atoll(value)) : 3;
}

void launch(int64_t blocks, int threads, size_t shared_bytes, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  TORCH_CHECK(shared_bytes <= max_shared_bytes(), "cuda emulator: ", shared_bytes, " bytes of shared memory requested");
  reserve_stacks(threads);
  ++launch_count;
  scheduler.body = &body;
  scheduler.error.clear();
  grid_dim = {static_cast<unsigned int>(blocks), 1, 1};
  block_dim = {static_cast<unsigned int>(threads), 1, 1};
  unsigned char* shared = mha_ext::cuda::shared_memory;
  for (int64_t b = 0; b < blocks; ++b) {
    block_index = {static_cast<unsigned int>(b), 0, 0};
    std::memset(shared, 0xff, shared_bytes + kGuardBytes);
    start_async_copies(threads, shared_bytes);
    run_block(threads);
    check_async_copies_waited_for(threads);
    for (size_t i = shared_bytes; i < shared_bytes + kGuardBytes; ++i)
      TORCH_CHECK(shared[i] == 0xff, "cuda emulator: block ", b, " wrote shared memory byte ", i, ", past the ",
                  shared_bytes, " bytes of its launch");
  }
}

}  // namespace mha_emu
