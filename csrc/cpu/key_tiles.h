// The key operand of the score products, K^T, kept per thread while consecutive work items read the same
// kv head.
//
// The score product S = (scale Q) K^T runs untransposed on brgemm (see gemm.cpp), which needs K^T. A key
// column range is transposed once per kv head and thread and then reused by every query tile (and every
// query head of a GQA group) that the thread computes next, where BLAS would repack the same key tile for
// each query tile.
#pragma once

#include <vector>

#include "cpu/tile.h"
#include "cpu/transpose.h"

namespace mha_ext::cpu {

template <typename acc_t>
class KeyTiles {
 public:
  // tile: the caller's key tile. Requests stay inside one tile, so they never wrap around the ring of
  // transposed columns, which holds all S columns where they fit in kMaxBytes and else a multiple of tile.
  KeyTiles(const AttentionParams& p, int64_t tile)
      : E_(p.E),
        capacity_(tile * std::clamp<int64_t>(kMaxBytes / std::max<int64_t>(p.E * tile * sizeof(acc_t), 1), 1,
                                             std::max<int64_t>(ceil_div(p.S, tile), 1))),
        S_(p.S),
        transposed_(p.E * capacity_),
        rows_(tile * p.E),
        owner_(capacity_ / kChunk, -1) {}

  // Key columns [k0, k0 + cols) of head's kv head: K^T from the ring, or the key rows themselves when the
  // product has fewer than kBlasMinRows query rows (decode), which streams K once without a transposition.
  template <typename Head>
  KeyOperand<acc_t> columns(const Head& head, int64_t k0, int64_t cols, int64_t query_rows) {
    if (query_rows < kBlasMinRows) return {head.key_rows(k0, cols, rows_.data()), false};
    if (head.k != head_key_) {
      std::fill(owner_.begin(), owner_.end(), int64_t(-1));
      head_key_ = head.k;
    }
    for (int64_t chunk = k0 / kChunk; chunk * kChunk < k0 + cols; ++chunk) {
      int64_t& owner = owner_[chunk % static_cast<int64_t>(owner_.size())];
      if (owner == chunk) continue;
      const int64_t c0 = chunk * kChunk, n = std::min(kChunk, S_ - c0);
      const RowsView<acc_t> rows = head.key_rows(c0, n, rows_.data());
      transpose(n, E_, rows.data, rows.ld, transposed_.data() + c0 % capacity_, capacity_);
      owner = chunk;
    }
    return {{transposed_.data() + k0 % capacity_, capacity_}, true};
  }

 private:
  static constexpr int64_t kChunk = kSpanChunk;  // tiles are trimmed to chunks: transpose no more than that
  static constexpr int64_t kMaxBytes = int64_t(8) << 20;
  int64_t E_, capacity_, S_;
  Scratch<acc_t> transposed_, rows_;  // rows_: key rows in the accumulation type, a chunk or a whole tile
  std::vector<int64_t> owner_;
  const void* head_key_ = nullptr;
};

}  // namespace mha_ext::cpu
