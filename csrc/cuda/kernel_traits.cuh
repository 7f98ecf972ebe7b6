// Tile shapes and shared-memory layouts of the CUDA kernels.
//
// Every kernel keeps its tiles in shared memory in the accumulation type (fp16/bf16 are widened once, on
// load), whole rows of the head dim at a time. A layout is a list of offsets computed from the tile
// shape and the actual E/Ev: the launcher sizes the dynamic shared memory from the same struct the kernel
// carves it with, so the two cannot disagree. The tile edge of each kernel is the largest power of two
// whose layout, at the largest head dim of its bucket, fits the shared-memory budget.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention/params.h"
#include "cuda/launch.h"

namespace mha_ext::cuda {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// 99 KiB: the per-block opt-in shared memory of the smallest sm80+ parts (sm86, sm89).
constexpr int64_t kSmemBudgetBytes = 99 * 1024;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

MHA_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

}  // namespace mha_ext::cuda
