// Attention dropout's random numbers: Philox4x32-10, a counter-based generator, so that each (query,
// key) pair's keep/drop decision is a pure function of (seed, offset, batch-head, row, column). The
// backward regenerates the forward's mask without storing it, and the mask does not depend on tiling,
// thread count or device.
#pragma once

#include <cstdint>

#include "attention/host_device.h"

namespace mha_ext {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The counter of the four (query, key) pairs (n, row, 4c .. 4c+3): c = column / 4.
struct DropoutCounter {
  uint32_t c0, c1, c2, c3;
  MHA_HOST_DEVICE DropoutCounter(int64_t n, int64_t row, int64_t column_block, uint64_t offset)
      : c0(static_cast<uint32_t>(column_block)),
        c1(static_cast<uint32_t>(row)),
        c2(static_cast<uint32_t>(n)),
        c3(static_cast<uint32_t>(offset) ^ static_cast<uint32_t>(static_cast<uint64_t>(n) >> 32)) {}
};

MHA_HOST_DEVICE inline void philox_round(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3, uint32_t k0,
                                         uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * x0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * x2;
  const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
  const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
  x1 = static_cast<uint32_t>(p1);
  x3 = static_cast<uint32_t>(p0);
  x0 = y0;
  x2 = y2;
}

// Four 32-bit random words for one counter; word c of the result decides column 4 * block + c.
MHA_HOST_DEVICE inline void philox4x32_10(DropoutCounter c, uint64_t seed, uint32_t out[4]) {
  uint32_t x0 = c.c0, x1 = c.c1, x2 = c.c2, x3 = c.c3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(x0, x1, x2, x3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
}

// A pair is kept when its random word is >= threshold: probability 1 - p. p >= 1 drops everything.
struct DropoutRule {
  bool active = false;       // dropout_p > 0
  bool drop_all = false;     // dropout_p >= 1
  uint32_t threshold = 0;    // floor(p * 2^32)
  double keep_scale = 1.0;   // 1 / (1 - p) for kept pairs
  uint64_t seed = 0;
  uint64_t offset = 0;
  // Where this call's pairs sit in a larger call whose decisions it reproduces (sequence-parallel attention
  // runs slices of one attention): its rows and columns start at row_offset / column_offset, and its
  // `heads` query heads per batch are heads head_offset.. of that call's total_heads. heads == 0: a whole call.
  int64_t row_offset = 0;
  int64_t column_offset = 0;
  int64_t heads = 0;
  int64_t head_offset = 0;
  int64_t total_heads = 0;

  MHA_HOST_DEVICE bool keeps(uint32_t word) const { return !drop_all && word >= threshold; }
  // The batch-head index of this call's batch-head n in the larger call.
  MHA_HOST_DEVICE int64_t global_head(int64_t n) const {
    return heads == 0 ? n : (n / heads) * total_heads + head_offset + n % heads;
  }
};

inline DropoutRule make_dropout_rule(double p, uint64_t seed, uint64_t offset) {
  DropoutRule rule;
  rule.active = p > 0.0;
  rule.drop_all = p >= 1.0;
  rule.threshold = rule.active && !rule.drop_all ? static_cast<uint32_t>(p * 4294967296.0) : 0u;
  rule.keep_scale = rule.drop_all ? 0.0 : 1.0 / (1.0 - p);
  rule.seed = seed;
  rule.offset = offset;
  return rule;
}

// The factor dropout puts on pair (n, row, col): 1 / (1 - p) where kept, 0 where dropped, 1 without
// dropout. One Philox call per pair: for kernels that decide pairs one at a time.
template <typename acc_t>
MHA_HOST_DEVICE acc_t dropout_factor(const DropoutRule& rule, int64_t n, int64_t row, int64_t col) {
  if (!rule.active) return acc_t(1);
  const int64_t column = col + rule.column_offset;
  uint32_t words[4];
  philox4x32_10(DropoutCounter(rule.global_head(n), row + rule.row_offset, column >> 2, rule.offset), rule.seed,
                words);
  // Selected, not indexed: a run-time index would put `words` in a GPU thread's local memory.
  const uint32_t word = column & 2 ? (column & 1 ? words[3] : words[2]) : (column & 1 ? words[1] : words[0]);
  return rule.keeps(word) ? static_cast<acc_t>(rule.keep_scale) : acc_t(0);
}

}  // namespace mha_ext
