// The key operands of the tile products, packed once per kv head and thread and reused while consecutive
// work items read the same kv head.
//
// The score product S = (scale Q) K^T runs untransposed on brgemm (see gemm.cpp), which needs K^T. A key
// column range is transposed once per kv head and thread and then reused by every query tile (and every
// query head of a GQA group) that the thread computes next, where BLAS would repack the same key tile for
// each query tile. The bf16 tile products (VnniKeyValueTiles) keep K^T and V in VNNI layout the same way.
#pragma once

#include <vector>

#include "cpu/tile.h"
#include "cpu/transpose.h"

namespace mha_ext::cpu {

// Which 32-key chunks of the current kv head a per-thread ring of packed keys holds. Requests stay inside
// one caller tile, so they never wrap around the ring, which holds all S keys where they fit in kMaxBytes
// and else a multiple of the tile.
class ChunkRing {
 public:
  static constexpr int64_t kChunk = kSpanChunk;  // tiles are trimmed to chunks: pack no more than that

  ChunkRing(int64_t S, int64_t tile, int64_t bytes_per_key)
      : S_(S),
        capacity_(tile * std::clamp<int64_t>(kMaxBytes / std::max<int64_t>(bytes_per_key * tile, 1), 1,
                                             std::max<int64_t>(ceil_div(S, tile), 1))),
        owner_(capacity_ / kChunk, -1) {}

  int64_t capacity() const { return capacity_; }
  int64_t slot(int64_t key) const { return key % capacity_; }

  // Calls pack(c0, n, slot) for each chunk [c0, c0 + n) of [k0, k0 + cols) that the ring does not hold for
  // this kv head (identified by its key pointer) yet.
  template <typename Pack>
  void fill(const void* head_key, int64_t k0, int64_t cols, Pack pack) {
    if (head_key != head_key_) {
      std::fill(owner_.begin(), owner_.end(), int64_t(-1));
      head_key_ = head_key;
    }
    for (int64_t chunk = k0 / kChunk; chunk * kChunk < k0 + cols; ++chunk) {
      int64_t& owner = owner_[chunk % static_cast<int64_t>(owner_.size())];
      if (owner == chunk) continue;
      const int64_t c0 = chunk * kChunk;
      pack(c0, std::min(kChunk, S_ - c0), slot(c0));
      owner = chunk;
    }
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t(8) << 20;
  int64_t S_, capacity_;
  std::vector<int64_t> owner_;
  const void* head_key_ = nullptr;
};

template <typename acc_t>
class KeyTiles {
 public:
  KeyTiles(const AttentionParams& p, int64_t tile)
      : E_(p.E), ring_(p.S, tile, p.E * sizeof(acc_t)), transposed_(p.E * ring_.capacity()), rows_(tile * p.E) {}

  // Key columns [k0, k0 + cols) of head's kv head: K^T from the ring, or the key rows themselves when the
  // product has fewer than kBlasMinRows query rows (decode), which streams K once without a transposition.
  template <typename Head>
  KeyOperand<acc_t> columns(const Head& head, int64_t k0, int64_t cols, int64_t query_rows) {
    if (query_rows < kBlasMinRows) return {head.key_rows(k0, cols, rows_.data()), false};
    const int64_t capacity = ring_.capacity();
    ring_.fill(head.k, k0, cols, [&](int64_t c0, int64_t n, int64_t slot) {
      const RowsView<acc_t> rows = head.key_rows(c0, n, rows_.data());
      transpose(n, E_, rows.data, rows.ld, transposed_.data() + slot, capacity);
    });
    return {{transposed_.data() + ring_.slot(k0), capacity}, true};
  }

 private:
  int64_t E_;
  ChunkRing ring_;
  Scratch<acc_t> transposed_, rows_;  // rows_: key rows in the accumulation type, a chunk or a whole tile
};

}  // namespace mha_ext::cpu
