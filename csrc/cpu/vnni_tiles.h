// K^T and V of the current kv head in the VNNI layout of the bf16 tile products (gemm_bf16_vnni), packed
// once per kv head and thread and reused by the query tiles that follow, like KeyTiles.
//
// VNNI keeps the two rows of each pair of the product's inner dimension side by side: element (i, j) of a
// K x N operand is at [i / 2][j][i % 2]. For K^T (inner dimension E) that is K's rows read as E / 2 bf16
// pairs and transposed as 32-bit words; for V (inner dimension: keys) it is pairs of V rows interleaved.
#pragma once

#include <immintrin.h>

#include "cpu/key_tiles.h"

namespace mha_ext::cpu {

// dst = pairs of src rows interleaved element by element: pair row r / 2 holds (src[r][j], src[r + 1][j])
// for j < cols, 2 * cols elements; an odd last row is paired with zeros.
inline void interleave_row_pairs(int64_t rows, int64_t cols, const c10::BFloat16* src, int64_t ld_src,
                                 c10::BFloat16* dst) {
  for (int64_t r = 0; r < rows; r += 2) {
    const c10::BFloat16* a = src + r * ld_src;
    const c10::BFloat16* b = src + (r + 1) * ld_src;
    c10::BFloat16* d = dst + r * cols;
    int64_t j = 0;
    if (r + 1 < rows) {
      for (; j + 16 <= cols; j += 16) {
        const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j));
        const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j));
        // unpack interleaves within each 128-bit lane; the permutes put the lanes back in order.
        const __m256i lo = _mm256_unpacklo_epi16(va, vb), hi = _mm256_unpackhi_epi16(va, vb);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * j), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * j + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    }
    for (; j < cols; ++j) {
      d[2 * j] = a[j];
      d[2 * j + 1] = r + 1 < rows ? b[j] : c10::BFloat16(0.f);
    }
  }
}

// dst = src^T in VNNI layout, for a product whose inner dimension is src's columns: src is rows x cols bf16
// (cols even, ld_src elements apart), dst holds cols / 2 pair rows of `rows` pairs, ld_dst pairs apart.
inline void transpose_pairs(int64_t rows, int64_t cols, const c10::BFloat16* src, int64_t ld_src,
                            c10::BFloat16* dst, int64_t ld_dst) {
  constexpr int64_t kPairBytes = 2 * sizeof(c10::BFloat16);
  transpose32(rows, cols / 2, src, ld_src * sizeof(c10::BFloat16), dst, ld_dst * kPairBytes);
}

// Why the kernels cannot take bf16 inputs through the VNNI tile products, in words; nullptr where they can:
// E even (K^T pairs its elements), and the CPU and torch run them (bf16_vnni_available).
inline const char* vnni_tiles_unavailable(const AttentionParams& p) {
  return p.E % 2 != 0 ? "the head dim E is odd (the VNNI layout pairs its elements)" : bf16_vnni_unavailable();
}

class VnniKeyValueTiles {
 public:
  struct Operands {
    const c10::BFloat16* keys_t;  // K^T: E / 2 pair rows, keys_ld pairs apart
    int64_t keys_ld;
    const c10::BFloat16* values;  // V: pair rows of 2 * Ev elements, Ev pairs apart
  };

  VnniKeyValueTiles(const AttentionParams& p, int64_t tile)
      : E_(p.E),
        Ev_(p.Ev),
        ring_(p.S, tile, (p.E + p.Ev) * sizeof(c10::BFloat16)),
        keys_t_(p.E * ring_.capacity()),
        values_(ring_.capacity() * p.Ev) {}

  // K^T and V for keys [k0, k0 + cols) of head's kv head; k0 is a multiple of ChunkRing::kChunk, so the
  // value pairs start on an even key.
  template <typename Head>
  Operands columns(const Head& head, int64_t k0, int64_t cols) {
    const int64_t capacity = ring_.capacity();
    const int64_t key_stride = head.p.key.row_stride, value_stride = head.p.value.row_stride;
    ring_.fill(head.k, k0, cols, [&](int64_t c0, int64_t n, int64_t slot) {
      transpose_pairs(n, E_, head.k + c0 * key_stride, key_stride, keys_t_.data() + 2 * slot, capacity);
      interleave_row_pairs(n, Ev_, head.v + c0 * value_stride, value_stride, values_.data() + slot * Ev_);
    });
    const int64_t slot = ring_.slot(k0);
    return {keys_t_.data() + 2 * slot, capacity, values_.data() + slot * Ev_};
  }

 private:
  int64_t E_, Ev_;
  ChunkRing ring_;
  Scratch<c10::BFloat16> keys_t_, values_;
};

}  // namespace mha_ext::cpu
