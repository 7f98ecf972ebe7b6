// What ptx.cpp (the sm80 instructions of csrc/cuda/ptx.cuh) shares with the rest of the emulator: the
// block events its cp.async model follows, told by emulator.cpp, and its shared-memory bank-conflict counts,
// read by module.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

namespace mha_emu {

// A block starts with no copies in flight and all of its `shared_bytes` of shared memory clean.
void start_async_copies(int threads, size_t shared_bytes);
// A __syncthreads has released the block: what the threads' waits landed is visible to every thread.
void publish_async_copies();
// The block's threads have exited: throws if one left a copy that it did not wait for.
void check_async_copies_waited_for(int threads);

// Per site ("ldmatrix", "ldmatrix.trans", "cp.async"): the warp-wide instructions run so far, over all
// launches of the process, and the shared-memory wavefronts they took beyond one per 8-lane phase.
std::map<std::string, std::pair<int64_t, int64_t>> bank_conflicts();
void reset_bank_conflicts();

}  // namespace mha_emu
