// Out-of-place matrix transpositions for the tile operands that the untransposed tile products need.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace mha_ext::cpu {

// dst (cols x rows) = src^T for 4-byte elements (floats, or the bf16 pairs of the VNNI layout), moved as
// bits; src is rows x cols. Strides in bytes, any alignment.
inline void transpose32(int64_t rows, int64_t cols, const void* src, int64_t src_stride, void* dst,
                        int64_t dst_stride) {
  const char* s0 = static_cast<const char*>(src);
  char* d0 = static_cast<char*>(dst);
  auto element = [](auto* base, int64_t stride, int64_t r, int64_t c) { return base + r * stride + c * 4; };
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      // 8 x 8 block in registers: interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
      __m256 r[8], t[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(element(s0, src_stride, i + k, j)));
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
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(reinterpret_cast<float*>(element(d0, dst_stride, j + k, i)),
                         _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(reinterpret_cast<float*>(element(d0, dst_stride, j + k + 4, i)),
                         _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
      }
    }
    for (; j < cols; ++j)
      for (int64_t k = i; k < i + 8; ++k) std::memcpy(element(d0, dst_stride, j, k), element(s0, src_stride, k, j), 4);
  }
  for (; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) std::memcpy(element(d0, dst_stride, j, i), element(s0, src_stride, i, j), 4);
}

// dst (cols x rows, leading dim ld_dst) = src^T, with src (rows x cols, leading dim ld_src).
inline void transpose(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  transpose32(rows, cols, src, ld_src * 4, dst, ld_dst * 4);
}

inline void transpose(int64_t rows, int64_t cols, const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

}  // namespace mha_ext::cpu
