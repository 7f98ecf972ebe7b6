// Tile shapes and shared-memory layouts of the CUDA kernels.
//
// The CUDA-core kernels keep their tiles in shared memory in the accumulation type (fp16/bf16 are widened
// once, on load), whole rows of the head dim at a time; the tensor-core forward keeps fp16/bf16 operands.
// A layout is a list of offsets computed from the tile shape and the actual E/Ev: the launcher sizes the
// dynamic shared memory from the same struct the kernel carves it with, so the two cannot disagree. The
// tile edge of each kernel is the largest power of two whose layout, at the largest head dim of its bucket,
// fits the shared-memory budget.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention/numerics.h"
#include "attention/params.h"
#include "cuda/launch.h"

// Device code that needs sm80 (mma.sync with bf16, ldmatrix, cp.async): compiled for sm80+ targets, and as
// host code by the CPU emulator of the tests (tests/cuda_emulator), which defines MHA_EXT_CUDA_EMULATOR.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MHA_EXT_CUDA_EMULATOR)
#define MHA_SM80_DEVICE_CODE 1
#else
#define MHA_SM80_DEVICE_CODE 0
#endif

namespace mha_ext::cuda {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// 99 KiB: the per-block opt-in shared memory of the smallest sm80+ parts (sm86, sm89).
constexpr int64_t kSmemBudgetBytes = 99 * 1024;

// Row length in shared memory for `width` columns: odd, so threads walking a column hit distinct banks.
MHA_HOST_DEVICE constexpr int padded(int width) { return width | 1; }

// Offsets below are in accumulation-type elements from the start of the dynamic shared memory.

// Forward: a query tile, one key/value tile, the output accumulator, the score tile and per-row softmax
// state (running max, running sum, this tile's rescale factor).
struct ForwardSmem {
  int q, k, v, out, scores, row_max, row_sum, rescale, total;
  MHA_HOST_DEVICE constexpr ForwardSmem(int block_q, int block_k, int E, int Ev)
      : q(0),
        k(q + block_q * padded(E)),
        v(k + block_k * padded(E)),
        out(v + block_k * padded(Ev)),
        scores(out + block_q * padded(Ev)),
        row_max(scores + block_q * padded(block_k)),
        row_sum(row_max + block_q),
        rescale(row_sum + block_q),
        total(rescale + block_q) {}
};

// Backward, dK/dV pass: the key tile it owns with its accumulators, and one query tile at a time with
// its probabilities, score gradients, LSE and delta.
struct KeyGradSmem {
  int k, v, grad_k, grad_v, q, grad_out, probs, grad_scores, lse, delta, total;
  MHA_HOST_DEVICE constexpr KeyGradSmem(int block_q, int block_k, int E, int Ev)
      : k(0),
        v(k + block_k * padded(E)),
        grad_k(v + block_k * padded(Ev)),
        grad_v(grad_k + block_k * padded(E)),
        q(grad_v + block_k * padded(Ev)),
        grad_out(q + block_q * padded(E)),
        probs(grad_out + block_q * padded(Ev)),
        grad_scores(probs + block_q * padded(block_k)),
        lse(grad_scores + block_q * padded(block_k)),
        delta(lse + block_q),
        total(delta + block_q) {}
};

// Backward, dQ pass: the query tile it owns with its accumulator, and one key/value tile at a time.
struct QueryGradSmem {
  int q, grad_out, grad_q, k, v, grad_scores, lse, delta, total;
  MHA_HOST_DEVICE constexpr QueryGradSmem(int block_q, int block_k, int E, int Ev)
      : q(0),
        grad_out(q + block_q * padded(E)),
        grad_q(grad_out + block_q * padded(Ev)),
        k(grad_q + block_q * padded(E)),
        v(k + block_k * padded(E)),
        grad_scores(v + block_k * padded(Ev)),
        lse(grad_scores + block_q * padded(block_k)),
        delta(lse + block_q),
        total(delta + block_q) {}
};

// Weights: a query tile, one key tile and the query rows' LSE.
struct WeightsSmem {
  int q, k, lse, total;
  MHA_HOST_DEVICE constexpr WeightsSmem(int block_q, int block_k, int E, int /*Ev*/)
      : q(0), k(q + block_q * padded(E)), lse(k + block_k * padded(E)), total(lse + block_q) {}
};

template <typename Layout, typename acc_t, int kHeadDim>
constexpr int largest_fitting_block() {
  for (int block = 64; block >= 4; block /= 2) {
    if (Layout(block, block, kHeadDim, kHeadDim).total * int64_t(sizeof(acc_t)) <= kSmemBudgetBytes) return block;
  }
  return 0;
}

// Square tiles of kBlock query rows by kBlock key rows for head dims up to kHeadDim.
template <typename scalar_t, int kHeadDim_, typename Layout_>
struct TileTraits {
  using acc_t = acc_type<scalar_t>;
  using Layout = Layout_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlock = largest_fitting_block<Layout, acc_t, kHeadDim>();
  static_assert(kBlock > 0, "no tile of this layout fits the shared-memory budget");
  static constexpr int kBlockQ = kBlock;
  static constexpr int kBlockK = kBlock;

  MHA_HOST_DEVICE static Layout layout(int E, int Ev) { return Layout(kBlockQ, kBlockK, E, Ev); }
  static size_t smem_bytes(int E, int Ev) { return size_t(layout(E, Ev).total) * sizeof(acc_t); }
};

// Edge of the 16 x 16 operand blocks of mma.sync m16n8k16 (A: 16 x 16, B: two 16 x 8): head dims and
// key counts are padded up to multiples of it.
constexpr int kMmaTile = 16;
constexpr int kMmaOperandBytes = 2;  // fp16 and bf16

// ---- Tensor-core tiles (mma.sync m16n8k16; forward_mma_kernel.cuh, backward_mma_kernel.cuh) ----

// Bytes of one cp.async copy and of one ldmatrix row: 8 16-bit elements.
constexpr int kChunkBytes = 16;
constexpr int kChunkElements = kChunkBytes / kMmaOperandBytes;

// A tile of `rows` rows of kHeadDim 16-bit elements in shared memory, each row followed by 16 bytes of
// padding. Rows are then (kHeadDim / 2 + 4) banks apart: the 8 rows an ldmatrix phase reads, and the 8
// chunks of 16 bytes a cp.async phase writes along a row, fall on distinct banks (no conflicts).
template <int kHeadDim>
struct PaddedTile {
  static constexpr int kRowElements = kHeadDim + kChunkElements;
  static constexpr int bytes(int rows) { return rows * kRowElements * kMmaOperandBytes; }
};

// ---- Tensor-core forward (forward_mma_kernel.cuh) ----

// Each warp owns kMTiles strips of 16 query rows, from its scores to its output rows, all in registers:
// per thread 8 kBlockK / 16 * kMTiles fp32 scores and kHeadDim / 2 * kMTiles fp32 outputs. Two strips up to
// head dim 128 (192 accumulator registers at 128, as FlashAttention-2's 128 x 64 tile: each K and V
// fragment loaded from shared memory feeds two products), one at 256 (160), and one in the kMasked kernels,
// whose per-element mask, bias and dropout addressing needs the registers a second strip would take (they
// spill with two). Key tiles of 64. Shared memory holds the query tile and one key and one value tile: the
// next K tile streams in (cp.async) while the warps multiply P V, the V tile while they multiply Q K^T.
template <int kHeadDim_, bool kMasked>
struct ForwardMmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kHeadDim <= 128 && !kMasked ? 2 : 1;
  static constexpr int kBlockQ = kWarps * kMmaTile * kMTiles;
  static constexpr int kBlockK = 64;
  using Tile = PaddedTile<kHeadDim>;
  static constexpr int kQ = 0, kK = Tile::bytes(kBlockQ), kV = kK + Tile::bytes(kBlockK);
  static constexpr int kSmemBytes = kV + Tile::bytes(kBlockK);
  // Every head dim fits the 99 KiB of every sm80+ part (256: exactly).
  static_assert(kSmemBytes <= kSmemBudgetBytes, "the tensor-core forward's tiles do not fit the shared-memory budget");
  static size_t smem_bytes() { return kSmemBytes; }
};

// ---- Tensor-core backward (backward_mma_kernel.cuh) ----

// A work item owns 64 rows, 16 per warp (keys in the dK/dV kernel, queries in the dQ kernel), whose two
// operand tiles stay in shared memory and whose gradient accumulators stay in registers, and streams the
// other side's two operand tiles kStreamedRows rows at a time. The dK/dV kernel streams 32 query rows: its
// warps hold dK and dV (kHeadDim / 2 registers each) besides S^T, dP^T (kStreamedRows / 2 each) and the
// streamed rows' LSE and delta; above head dim 128 it accumulates dV and dK in two passes (kJointKeyGrads,
// KeyGrads). The dQ kernel streams 64 key rows, 32 above head dim 128, where the four tiles then take
// exactly the 99 KiB budget. The kMasked kernels stream half as many rows: their per-element mask, bias and
// dropout addressing needs the registers (with the plain kernels' tiles they spill), as the forward's.
template <int kHeadDim_, int kStreamedRows_>
struct BackwardMmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kOwnedRows = kWarps * kMmaTile, kStreamedRows = kStreamedRows_;
  static constexpr bool kJointKeyGrads = kHeadDim <= 128;
  using Tile = PaddedTile<kHeadDim>;
  static constexpr int kOwnedA = 0, kOwnedB = Tile::bytes(kOwnedRows), kStreamedA = 2 * Tile::bytes(kOwnedRows),
                       kStreamedB = kStreamedA + Tile::bytes(kStreamedRows);
  static constexpr int kSmemBytes = kStreamedB + Tile::bytes(kStreamedRows);
  static_assert(kSmemBytes <= kSmemBudgetBytes, "the tensor-core backward's tiles do not fit the shared-memory budget");
  static size_t smem_bytes() { return kSmemBytes; }
};
template <int kHeadDim, bool kMasked>
using KeyGradMmaTraits = BackwardMmaTraits<kHeadDim, kMasked ? 16 : 32>;
template <int kHeadDim, bool kMasked>
using QueryGradMmaTraits = BackwardMmaTraits<kHeadDim, (kHeadDim <= 128 ? 64 : 32) / (kMasked ? 2 : 1)>;

}  // namespace mha_ext::cuda
