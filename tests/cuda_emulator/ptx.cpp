// The sm80 instructions of csrc/cuda/ptx.cuh for kernels compiled by the emulator, exactly as the PTX ISA
// defines them (fragment layouts in ptx.cuh): mma.sync m16n8k16, ldmatrix and cp.async are warp collectives
// (emulator.cpp), which check their rules and do the whole warp's work at once. cp.async is a collective
// too, which PTX does not require but the kernels satisfy (they issue it convergently), so that its shared-
// memory bank conflicts can be counted per warp-wide instruction.
//
// cp.async keeps its copies in flight until the issuing thread's cp.async.wait_group lands them (their
// bytes were read at issue), and a shadow state of shared memory catches what a GPU would race on: an
// ldmatrix of bytes in flight, or of bytes another thread's wait landed before a __syncthreads published
// them, and a copy onto bytes still in flight. The shadow is kept per 16-byte chunk: every cp.async and
// every ldmatrix row is one whole aligned chunk.
#include "cuda/ptx.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ptx.h"

namespace mha_ext::cuda {
extern unsigned char shared_memory[];  // emulator.cpp's
}  // namespace mha_ext::cuda

namespace mha_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kChunkBytes = 16;

// Where a warp's instruction broke a rule; the launch throws it.
template <typename... Message>
[[noreturn]] void fail_warp(const char* site, int thread, const Message&... message) {
  TORCH_CHECK(false, "cuda emulator: ", site, " in block ", block_index.x, ", warp ", thread / kWarpSize, ": ",
              message...);
}

// --- cp.async's copies and the shadow state of shared memory ---

struct Chunk {
  enum Kind : uint8_t { kClean, kInFlight, kLanded };
  Kind kind = kClean;
  uint16_t thread = 0;  // the copy's issuing thread (in flight) or landing thread (landed)
};

struct Copy {
  uint32_t chunk;
  uint32_t group;  // the issuing thread's commits before it: committed once that many more are made
  unsigned char bytes[kChunkBytes];
};

struct ThreadCopies {
  std::vector<Copy> in_flight;  // in issue order (so by group); kept between blocks for their capacity
  uint32_t commits = 0;
};

struct AsyncCopies {
  Chunk chunks[kMaxSharedBytes / kChunkBytes];
  std::vector<uint32_t> landed;  // chunks landed since the last __syncthreads
  std::vector<ThreadCopies> threads;
  size_t shared_bytes = 0;
};

AsyncCopies async_copies;

std::string chunk_bytes(uint32_t chunk) {
  return "shared memory bytes " + std::to_string(chunk * kChunkBytes) + "-" +
         std::to_string(chunk * kChunkBytes + kChunkBytes - 1);
}

// The chunk that lane `thread` addresses: 16-byte aligned and inside the launch's dynamic shared memory.
uint32_t shared_chunk(const char* site, int thread, const void* address) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(mha_ext::cuda::shared_memory);
  const uintptr_t at = reinterpret_cast<uintptr_t>(address);
  if (at < begin || at - begin + kChunkBytes > async_copies.shared_bytes)
    fail_warp(site, thread, "thread ", thread, "'s 16 bytes at ", address, " are not inside the ",
              async_copies.shared_bytes, " bytes of dynamic shared memory of the launch");
  if ((at - begin) % kChunkBytes != 0)
    fail_warp(site, thread, "thread ", thread, "'s shared-memory address (byte ", at - begin,
              ") is not 16-byte aligned");
  return static_cast<uint32_t>((at - begin) / kChunkBytes);
}

// Lane `thread` of an ldmatrix may read a chunk unless a copy into it is in flight or another thread landed
// it and no __syncthreads has published it since.
void check_readable(const char* site, int thread, uint32_t chunk) {
  const Chunk& state = async_copies.chunks[chunk];
  if (state.kind == Chunk::kInFlight)
    fail_warp(site, thread, "thread ", thread, "'s row is ", chunk_bytes(chunk), ", which a cp.async of thread ",
              state.thread, " writes and which has not been waited for");
  if (state.kind == Chunk::kLanded && state.thread != thread)
    fail_warp(site, thread, "thread ", thread, "'s row is ", chunk_bytes(chunk), ", which a cp.async of thread ",
              state.thread, " wrote: read before a __syncthreads made it visible to other threads");
}

// --- bank conflicts ---

struct BankCounts {
  int64_t accesses = 0;
  int64_t extra_wavefronts = 0;
};

BankCounts ldmatrix_banks, ldmatrix_trans_banks, cp_async_banks;

// The wavefronts beyond the first of one phase of a shared-memory access: 8 lanes, a 16-byte chunk each. A
// chunk covers the 4 banks of quad chunk % 8 (shared memory is 128-byte aligned), so each bank of a quad sees
// as many distinct words as the quad sees distinct chunks; the busiest bank sets the count.
int extra_wavefronts(const uint32_t (&chunks)[8]) {
  int distinct_per_quad[8] = {};
  for (int i = 0; i < 8; ++i)
    if (std::find(chunks, chunks + i, chunks[i]) == chunks + i) ++distinct_per_quad[chunks[i] % 8];
  return *std::max_element(distinct_per_quad, distinct_per_quad + 8) - 1;
}

// --- the instructions, one collective each ---

float widen(uint32_t bits, bool bf16) {
  const auto half = static_cast<uint16_t>(bits);
  return bf16 ? static_cast<float>(c10::BFloat16(half, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(half, c10::Half::from_bits()));
}

struct MmaLane {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  bool bf16;
  int thread;
};

// D = A B + C for the 16 x 16 A, 16 x 8 B and C the lanes hold in fragments; products and sums in fp32, in
// k order from C. Every operand is read before any D is written: d is c in the kernels.
void mma_of_warp(const void* const* inputs, void* const* outputs) {
  float a[16][16], b[16][8], c[16][8];
  const auto& first = *static_cast<const MmaLane*>(inputs[0]);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const auto& in = *static_cast<const MmaLane*>(inputs[lane]);
    if (in.bf16 != first.bf16)
      fail_warp("mma.m16n8k16", in.thread, "the lanes of a warp pass different operand types (f16 and bf16)");
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      a[row][col] = widen(in.a[i], in.bf16);
      a[row][col + 1] = widen(in.a[i] >> 16, in.bf16);
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * t + 8 * i;
      b[k][g] = widen(in.b[i], in.bf16);
      b[k + 1][g] = widen(in.b[i] >> 16, in.bf16);
    }
    for (int i = 0; i < 4; ++i) c[g + 8 * (i / 2)][2 * t + i % 2] = in.c[i];
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    float* d = static_cast<float*>(outputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float sum = c[row][col];
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[i] = sum;
    }
  }
}

struct LdmatrixLane {
  const void* row;
  int count;
  bool trans;
  int thread;
};

void ldmatrix_of_warp(const void* const* inputs, void* const* outputs) {
  const auto& first = *static_cast<const LdmatrixLane*>(inputs[0]);
  const char* site = first.trans ? "ldmatrix.trans" : "ldmatrix";
  if (first.count != 1 && first.count != 2 && first.count != 4)
    fail_warp(site, first.thread, "loads 1, 2 or 4 matrices, not ", first.count);
  for (int lane = 1; lane < kWarpSize; ++lane) {
    const auto& in = *static_cast<const LdmatrixLane*>(inputs[lane]);
    if (in.count != first.count || in.trans != first.trans)
      fail_warp(site, in.thread, "the lanes of a warp ask for different matrix counts or transposition");
  }
  BankCounts& banks = first.trans ? ldmatrix_trans_banks : ldmatrix_banks;
  ++banks.accesses;
  uint16_t matrices[4][8][8];
  for (int i = 0; i < first.count; ++i) {
    uint32_t chunks[8];
    for (int row = 0; row < 8; ++row) {
      const auto& in = *static_cast<const LdmatrixLane*>(inputs[8 * i + row]);
      chunks[row] = shared_chunk(site, in.thread, in.row);
      check_readable(site, in.thread, chunks[row]);
      std::memcpy(matrices[i][row], mha_ext::cuda::shared_memory + chunks[row] * kChunkBytes, kChunkBytes);
    }
    banks.extra_wavefronts += extra_wavefronts(chunks);
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    uint32_t* r = static_cast<uint32_t*>(outputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < first.count; ++i) {
      const auto& m = matrices[i];
      const uint32_t low = first.trans ? m[2 * t][g] : m[g][2 * t];
      const uint32_t high = first.trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
      r[i] = low | high << 16;
    }
  }
}

struct CopyLane {
  void* smem;
  const void* gmem;
  bool in_bounds;
  int thread;
};

// Each lane's 16 bytes (read now, or zeros) join its thread's open group, in flight to their chunk.
void cp_async_of_warp(const void* const* inputs, void* const*) {
  uint32_t chunks[4][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const auto& in = *static_cast<const CopyLane*>(inputs[lane]);
    const uint32_t chunk = shared_chunk("cp.async", in.thread, in.smem);
    if (in.in_bounds && reinterpret_cast<uintptr_t>(in.gmem) % kChunkBytes != 0)
      fail_warp("cp.async", in.thread, "thread ", in.thread, "'s global address ", in.gmem,
                " is not 16-byte aligned");
    Chunk& state = async_copies.chunks[chunk];
    if (state.kind == Chunk::kInFlight)
      fail_warp("cp.async", in.thread, "thread ", in.thread, " copies to ", chunk_bytes(chunk),
                ", which an earlier cp.async of thread ", state.thread, " still writes (not waited for yet)");
    ThreadCopies& mine = async_copies.threads[in.thread];
    Copy& copy = mine.in_flight.emplace_back();
    copy.chunk = chunk;
    copy.group = mine.commits;
    if (in.in_bounds) std::memcpy(copy.bytes, in.gmem, kChunkBytes);
    else std::memset(copy.bytes, 0, kChunkBytes);
    state = {Chunk::kInFlight, static_cast<uint16_t>(in.thread)};
    chunks[lane / 8][lane % 8] = chunk;
  }
  ++cp_async_banks.accesses;
  for (const auto& phase : chunks) cp_async_banks.extra_wavefronts += extra_wavefronts(phase);
}

}  // namespace

void start_async_copies(int threads, size_t shared_bytes) {
  async_copies.shared_bytes = shared_bytes;
  std::fill_n(async_copies.chunks, (shared_bytes + kChunkBytes - 1) / kChunkBytes, Chunk{});
  async_copies.landed.clear();
  async_copies.threads.resize(threads);
  for (ThreadCopies& copies : async_copies.threads) {
    copies.in_flight.clear();
    copies.commits = 0;
  }
}

void publish_async_copies() {
  for (const uint32_t chunk : async_copies.landed) {
    Chunk& state = async_copies.chunks[chunk];
    if (state.kind == Chunk::kLanded) state = Chunk{};  // else a later copy is in flight to it
  }
  async_copies.landed.clear();
}

void check_async_copies_waited_for(int threads) {
  for (int t = 0; t < threads; ++t) {
    const std::vector<Copy>& in_flight = async_copies.threads[t].in_flight;
    TORCH_CHECK(in_flight.empty(), "cuda emulator: block ", block_index.x, ", thread ", t, " exited with ",
                in_flight.size(), " cp.async never waited for (the first to ", chunk_bytes(in_flight[0].chunk),
                ")");
  }
}

std::map<std::string, std::pair<int64_t, int64_t>> bank_conflicts() {
  const auto entry = [](const BankCounts& counts) { return std::make_pair(counts.accesses, counts.extra_wavefronts); };
  return {{"ldmatrix", entry(ldmatrix_banks)},
          {"ldmatrix.trans", entry(ldmatrix_trans_banks)},
          {"cp.async", entry(cp_async_banks)}};
}

void reset_bank_conflicts() { ldmatrix_banks = ldmatrix_trans_banks = cp_async_banks = BankCounts{}; }

}  // namespace mha_emu

namespace mha_ext::cuda::ptx {

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16) {
  const mha_emu::MmaLane lane{a, b, c, bf16, static_cast<int>(threadIdx.x)};
  mha_emu::warp_collective("mma.m16n8k16", mha_emu::mma_of_warp, &lane, d);
}

void ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row) {
  const mha_emu::LdmatrixLane lane{smem_row, count, trans, static_cast<int>(threadIdx.x)};
  mha_emu::warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", mha_emu::ldmatrix_of_warp, &lane, r);
}

void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  const mha_emu::CopyLane lane{smem, gmem, in_bounds, static_cast<int>(threadIdx.x)};
  mha_emu::warp_collective("cp.async", mha_emu::cp_async_of_warp, &lane, nullptr);
}

void cp_async_commit() { ++mha_emu::async_copies.threads[threadIdx.x].commits; }

// Lands, in issue order, the copies of every committed group but the newest `pending`; copies not yet
// committed stay in flight.
void cp_async_wait(int pending) {
  if (pending < 0) mha_emu::fail("cp.async.wait_group: the number of pending groups is negative");
  mha_emu::ThreadCopies& mine = mha_emu::async_copies.threads[threadIdx.x];
  const uint32_t landing = mine.commits >= static_cast<uint32_t>(pending) ? mine.commits - pending : 0;
  auto copy = mine.in_flight.begin();
  for (; copy != mine.in_flight.end() && copy->group < landing; ++copy) {
    std::memcpy(mha_ext::cuda::shared_memory + copy->chunk * mha_emu::kChunkBytes, copy->bytes,
                mha_emu::kChunkBytes);
    mha_emu::async_copies.chunks[copy->chunk] = {mha_emu::Chunk::kLanded, static_cast<uint16_t>(threadIdx.x)};
    mha_emu::async_copies.landed.push_back(copy->chunk);
  }
  mine.in_flight.erase(mine.in_flight.begin(), copy);
}

}  // namespace mha_ext::cuda::ptx
