// Attention dropout on the CPU: the Philox words of eight counters at a time (AVX2), then each (query,
// key) pair's keep/drop decision by the rule of csrc/attention/philox.h.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "attention/philox.h"

namespace mha_ext::cpu {

constexpr int kPhiloxLanes = 8;

#if defined(__AVX2__)
// (hi, lo) 32-bit halves of the eight products a[l] * m: even lanes and odd lanes multiply separately.
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// words[w][l] = word w of the counter (n, row, first_block + l), for l < kPhiloxLanes: the same values as
// philox4x32_10, eight counters at a time.
inline void philox_words(const DropoutRule& rule, int64_t n, int64_t row, int64_t first_block,
                         uint32_t words[4][kPhiloxLanes]) {
  const DropoutCounter c(n, row, first_block, rule.offset);
  uint32_t k0 = static_cast<uint32_t>(rule.seed), k1 = static_cast<uint32_t>(rule.seed >> 32);
#if defined(__AVX2__)
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c.c0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(c.c1));
  __m256i x2 = _mm256_set1_epi32(static_cast<int>(c.c2));
  __m256i x3 = _mm256_set1_epi32(static_cast<int>(c.c3));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hi_lo(x0, m0, hi0, lo0);
    mul_hi_lo(x2, m1, hi1, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo1;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0]), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1]), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2]), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3]), x3);
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    uint32_t out[4];
    philox4x32_10(DropoutCounter(n, row, first_block + l, rule.offset), rule.seed, out);
    for (int w = 0; w < 4; ++w) words[w][l] = out[w];
  }
#endif
}

// Calls visit(j, kept) for the key columns k0 + j, j < cols, of query row `row` of batch-head n (local to the
// call: the rule maps them to the larger call's coordinates).
template <typename Visit>
void for_each_dropout_decision(const DropoutRule& rule, int64_t n, int64_t row, int64_t k0, int64_t cols,
                               Visit&& visit) {
  uint32_t words[4][kPhiloxLanes];
  constexpr int64_t kColumnsPerBatch = 4 * kPhiloxLanes;
  const int64_t head = rule.global_head(n), global_row = row + rule.row_offset;
  const int64_t begin = k0 + rule.column_offset, end = begin + cols;
  for (int64_t first = begin & ~int64_t(3); first < end; first += kColumnsPerBatch) {
    philox_words(rule, head, global_row, first >> 2, words);
    const int64_t from = std::max(first, begin), to = std::min(first + kColumnsPerBatch, end);
    for (int64_t col = from; col < to; ++col) visit(col - begin, rule.keeps(words[col & 3][(col - first) >> 2]));
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
