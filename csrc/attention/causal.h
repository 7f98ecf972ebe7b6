// The causal rule every kernel asks for its key range, the tiles it skips and the pairs it masks.
#pragma once

#include <cstdint>

#include "attention/host_device.h"

namespace mha_ext {

// Causality: query row i attends key column j only where j <= i + offset. Offset 0 puts the diagonal in
// the top-left corner (torch's is_causal=True); S - L in the bottom-right one, so that the last query row
// sees every key (decoding with a KV cache, chunked prefill). Rows with i + offset < 0 attend nothing.
struct CausalRule {
  bool active = false;
  int64_t offset = 0;

  MHA_HOST_DEVICE bool excludes(int64_t i, int64_t j) const { return active && j > i + offset; }
  // One past the last key column any of query rows [q0, q0 + rows) attends, within [0, S].
  MHA_HOST_DEVICE int64_t key_end(int64_t q0, int64_t rows, int64_t S) const {
    if (!active) return S;
    const int64_t end = q0 + rows + offset;
    return end < 0 ? 0 : (end > S ? S : end);
  }
  // The first query row that attends key column j.
  MHA_HOST_DEVICE int64_t first_query(int64_t j) const {
    const int64_t row = j - offset;
    return !active || row < 0 ? 0 : row;
  }
};

}  // namespace mha_ext
