// Attention dropout on the CPU: the Philox words of eight counters at a time, laid out so the compiler
// vectorises the rounds, then each (query, key) pair's keep/drop decision from csrc/attention/philox.h.
#pragma once

#include <cstdint>

#include "attention/philox.h"

namespace mha_ext::cpu {

constexpr int kPhiloxLanes = 8;

// words[4 * l + w] = word w of the counter (n, row, first_block + l), for l < kPhiloxLanes.
inline void philox_words(const DropoutRule& rule, int64_t n, int64_t row, int64_t first_block,
                         uint32_t words[4 * kPhiloxLanes]) {
  uint32_t x0[kPhiloxLanes], x1[kPhiloxLanes], x2[kPhiloxLanes], x3[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const DropoutCounter c(n, row, first_block + l, rule.offset);
    x0[l] = c.c0;
    x1[l] = c.c1;
    x2[l] = c.c2;
    x3[l] = c.c3;
  }
  uint32_t k0 = static_cast<uint32_t>(rule.seed), k1 = static_cast<uint32_t>(rule.seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int l = 0; l < kPhiloxLanes; ++l) philox_round(x0[l], x1[l], x2[l], x3[l], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    words[4 * l] = x0[l];
    words[4 * l + 1] = x1[l];
    words[4 * l + 2] = x2[l];
    words[4 * l + 3] = x3[l];
  }
}

// Calls visit(j, kept) for the key columns k0 + j, j < cols, of query row `row` of batch-head n.
template <typename Visit>
void for_each_dropout_decision(const DropoutRule& rule, int64_t n, int64_t row, int64_t k0, int64_t cols,
                               Visit&& visit) {
  uint32_t words[4 * kPhiloxLanes];
  constexpr int64_t kColumnsPerBatch = 4 * kPhiloxLanes;
  const int64_t end = k0 + cols;
  for (int64_t first = k0 & ~int64_t(3); first < end; first += kColumnsPerBatch) {
    philox_words(rule, n, row, first >> 2, words);
    const int64_t from = std::max(first, k0), to = std::min(first + kColumnsPerBatch, end);
    for (int64_t col = from; col < to; ++col) visit(col - k0, rule.keeps(words[col - first]));
  }
}

// values[j] (key column k0 + j) *= 1 / (1 - p) where kept, 0 where dropped.
template <typename acc_t>
void apply_dropout_row(const DropoutRule& rule, int64_t n, int64_t row, int64_t k0, int64_t cols, acc_t* values) {
  const acc_t keep_scale = static_cast<acc_t>(rule.keep_scale);
  for_each_dropout_decision(rule, n, row, k0, cols,
                            [&](int64_t j, bool kept) { values[j] = kept ? values[j] * keep_scale : acc_t(0); });
}

}  // namespace mha_ext::cpu
