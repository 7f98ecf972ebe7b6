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

// Device code that needs sm80 (bf16 WMMA): compiled for sm80+ targets, and as host code by the CPU
// emulator of the tests (tests/cuda_emulator), which defines MHA_EXT_CUDA_EMULATOR.
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
// 163 KiB: the opt-in of sm80 (A100; sm90 allows 227 KiB). The tensor-core kernels size their tiles for
// head dims 129..256 to it; parts with less run those head dims on CUDA cores (shared_memory_fits).
constexpr int64_t kLargeSmemBudgetBytes = 163 * 1024;

// The budget the tensor-core kernels' tiles are sized to for the head-dim bucket up to `head_dim`.
MHA_HOST_DEVICE constexpr int64_t tensor_core_smem_budget(int head_dim) {
  return head_dim <= 128 ? kSmemBudgetBytes : kLargeSmemBudgetBytes;
}

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

// Edge of a WMMA m16n16k16 tile: head dims and key counts are padded up to multiples of it.
constexpr int kMmaTile = 16;
// WMMA fragment pointers must be 256-bit aligned: every region and every 16-row strip starts on it.
constexpr int kMmaAlignBytes = 32;
constexpr int kMmaOperandBytes = 2;  // fp16 and bf16

MHA_HOST_DEVICE constexpr int round_up(int n, int multiple) { return (n + multiple - 1) / multiple * multiple; }

// ---- Tensor-core forward (mma.sync m16n8k16; forward_mma_kernel.cuh) ----

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

// ---- Tensor-core backward (mma.sync m16n8k16; backward_mma_kernel.cuh), head dims up to 128 ----

// A work item owns 64 rows, 16 per warp (keys in the dK/dV kernel, queries in the dQ kernel), whose two
// operand tiles stay in shared memory and whose gradient accumulators stay in registers, and streams the
// other side's two operand tiles kStreamedRows rows at a time, with their LSE and delta (dK/dV kernel).
// The dK/dV kernel streams 32 query rows: its warps hold dK and dV (kHeadDim / 2 registers each) besides
// S^T and dP^T (kStreamedRows / 2 each).
// Head dims above it run on the WMMA backward (backward_tc_kernel.cuh).
constexpr int kMaxMmaBackwardHeadDim = 128;

template <int kHeadDim_, int kStreamedRows_>
struct BackwardMmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kOwnedRows = kWarps * kMmaTile, kStreamedRows = kStreamedRows_;
  using Tile = PaddedTile<kHeadDim>;
  static constexpr int kOwnedA = 0, kOwnedB = Tile::bytes(kOwnedRows), kStreamedA = 2 * Tile::bytes(kOwnedRows),
                       kStreamedB = kStreamedA + Tile::bytes(kStreamedRows),
                       kRowStats = kStreamedB + Tile::bytes(kStreamedRows);
  static constexpr int kSmemBytes = kRowStats + 2 * kStreamedRows * int(sizeof(float));
  static_assert(kHeadDim > kMaxMmaBackwardHeadDim || kSmemBytes <= kSmemBudgetBytes,
                "the tensor-core backward's tiles do not fit the shared-memory budget");
  static size_t smem_bytes() { return kSmemBytes; }
};
template <int kHeadDim>
using KeyGradMmaTraits = BackwardMmaTraits<kHeadDim, 32>;
template <int kHeadDim>
using QueryGradMmaTraits = BackwardMmaTraits<kHeadDim, 64>;

// ---- Tensor-core backward (backward_tc_kernel.cuh) ----

// Query rows by key rows of a tile pair; both multiples of 16.
struct TileShape {
  int block_q, block_k;
};

// Row lengths shared by the backward's layouts, in elements: 16-bit operand rows of Q/K (ld_qk) and of
// V/dO (ld_v) padded as in the forward; fp32 rows of the score-sized tiles S and dP (ld_scores); 16-bit
// rows of P and dS (ld_probs); fp32 rows of the dQ/dK (ld_grad_qk) and dV (ld_grad_v) accumulators.
struct BackwardTensorCoreRows {
  int ld_qk, ld_v, ld_scores, ld_probs, ld_grad_qk, ld_grad_v;
  MHA_HOST_DEVICE constexpr BackwardTensorCoreRows(int block_k, int E, int Ev)
      : ld_qk(round_up(E, kMmaTile) + 16 / kMmaOperandBytes),
        ld_v(round_up(Ev, kMmaTile) + 16 / kMmaOperandBytes),
        ld_scores(block_k + 16 / 4),
        ld_probs(block_k + 16 / kMmaOperandBytes),
        ld_grad_qk(round_up(E, kMmaTile) + 16 / 4),
        ld_grad_v(round_up(Ev, kMmaTile) + 16 / 4) {}
};

// Bytes of `rows` rows of `ld` elements of `bytes` each, rounded up so that the next region stays aligned
// for WMMA.
MHA_HOST_DEVICE constexpr int region_bytes(int rows, int ld, int bytes) {
  return round_up(rows * ld * bytes, kMmaAlignBytes);
}

// dK/dV pass: the key tile it owns (K, V and the fp32 dK, dV accumulators), and one query tile at a time:
// Q, dO, S = Q K^T, dP = dO V^T, the 16-bit P and dS, LSE and delta. Offsets in bytes.
struct KeyGradTensorCoreSmem : BackwardTensorCoreRows {
  int k, v, grad_k, grad_v, q, grad_out, scores, grad_probs, probs, grad_scores, lse, delta, total;
  MHA_HOST_DEVICE constexpr KeyGradTensorCoreSmem(int block_q, int block_k, int E, int Ev)
      : BackwardTensorCoreRows(block_k, E, Ev),
        k(0),
        v(k + region_bytes(block_k, ld_qk, kMmaOperandBytes)),
        grad_k(v + region_bytes(block_k, ld_v, kMmaOperandBytes)),
        grad_v(grad_k + region_bytes(block_k, ld_grad_qk, 4)),
        q(grad_v + region_bytes(block_k, ld_grad_v, 4)),
        grad_out(q + region_bytes(block_q, ld_qk, kMmaOperandBytes)),
        scores(grad_out + region_bytes(block_q, ld_v, kMmaOperandBytes)),
        grad_probs(scores + region_bytes(block_q, ld_scores, 4)),
        probs(grad_probs + region_bytes(block_q, ld_scores, 4)),
        grad_scores(probs + region_bytes(block_q, ld_probs, kMmaOperandBytes)),
        lse(grad_scores + region_bytes(block_q, ld_probs, kMmaOperandBytes)),
        delta(lse + block_q * 4),
        total(delta + block_q * 4) {}
  // Large tiles of the keys it owns first: those are loaded once per work item, queries once per pair.
  static constexpr TileShape kCandidates[] = {{64, 64}, {32, 64}, {32, 32}, {16, 32}, {16, 16}};
};

// dQ pass: the query tile it owns (Q, dO and the fp32 dQ accumulator, LSE, delta), and one key tile at a
// time: K, V, S, dP and the 16-bit dS. Offsets in bytes.
struct QueryGradTensorCoreSmem : BackwardTensorCoreRows {
  int q, grad_out, grad_q, k, v, scores, grad_probs, grad_scores, lse, delta, total;
  MHA_HOST_DEVICE constexpr QueryGradTensorCoreSmem(int block_q, int block_k, int E, int Ev)
      : BackwardTensorCoreRows(block_k, E, Ev),
        q(0),
        grad_out(q + region_bytes(block_q, ld_qk, kMmaOperandBytes)),
        grad_q(grad_out + region_bytes(block_q, ld_v, kMmaOperandBytes)),
        k(grad_q + region_bytes(block_q, ld_grad_qk, 4)),
        v(k + region_bytes(block_k, ld_qk, kMmaOperandBytes)),
        scores(v + region_bytes(block_k, ld_v, kMmaOperandBytes)),
        grad_probs(scores + region_bytes(block_q, ld_scores, 4)),
        grad_scores(grad_probs + region_bytes(block_q, ld_scores, 4)),
        lse(grad_scores + region_bytes(block_q, ld_probs, kMmaOperandBytes)),
        delta(lse + block_q * 4),
        total(delta + block_q * 4) {}
  // Large tiles of the queries it owns first.
  static constexpr TileShape kCandidates[] = {{64, 64}, {64, 32}, {32, 64}, {32, 32}, {16, 32}, {16, 16}};
};

// The first of Layout::kCandidates (in order of preference) that fits the budget of head dim kHeadDim's
// bucket at that head dim.
template <typename Layout, int kHeadDim>
constexpr TileShape first_fitting_shape() {
  for (const TileShape& shape : Layout::kCandidates) {
    if (Layout(shape.block_q, shape.block_k, kHeadDim, kHeadDim).total <= tensor_core_smem_budget(kHeadDim))
      return shape;
  }
  return {0, 0};
}

template <typename Layout_, int kHeadDim_>
struct BackwardTensorCoreTraits {
  using Layout = Layout_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr TileShape kShape = first_fitting_shape<Layout, kHeadDim>();
  static constexpr int kBlockQ = kShape.block_q;
  static constexpr int kBlockK = kShape.block_k;
  static_assert(kBlockQ > 0, "no tile of the tensor-core backward fits the shared-memory budget");

  MHA_HOST_DEVICE static Layout layout(int E, int Ev) { return Layout(kBlockQ, kBlockK, E, Ev); }
  static size_t smem_bytes(int E, int Ev) { return size_t(layout(E, Ev).total); }
};

}  // namespace mha_ext::cuda
