// Out-of-place matrix transposition for the tile operands that the untransposed tile products need.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mha_ext::cpu {

// dst (cols x rows, leading dim ld_dst) = src^T, with src (rows x cols, leading dim ld_src).
inline void transpose(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      // 8 x 8 block in registers: interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
      const float* s = src + i * ld_src + j;
      __m256 r[8], t[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(s + k * ld_src);
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
      }
      float* d = dst + j * ld_dst + i;
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(d + k * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(d + (k + 4) * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
      }
    }
    for (; j < cols; ++j)
      for (int64_t k = i; k < i + 8; ++k) dst[j * ld_dst + k] = src[k * ld_src + j];
  }
  for (; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

inline void transpose(int64_t rows, int64_t cols, const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

}  // namespace mha_ext::cpu
