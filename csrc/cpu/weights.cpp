// Attention probabilities on the CPU, recomputed tile by tile from the saved LSE (for callers that
// need the weights, e.g. nn.MultiheadAttention's need_weights=True).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "cpu/key_tiles.h"

namespace mha_ext::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

template <typename scalar_t>
void weights_kernel(const AttentionParams& p, scalar_t* weights) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = p.L, S = p.S, E = p.E;
  // Work items in (batch-head, query tile) order: consecutive items of a thread read the same kv head, whose
  // packed keys it keeps (KeyTiles, VnniKeyValueTiles).
  const int64_t q_tiles = ceil_div(L, kBlockQ);
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);
  at::parallel_for(0, p.grid.numel * q_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> q_buf(kBlockQ * E), scores(kBlockQ * kBlockK);
    KeyTiles<acc_t> keys(p, kBlockK);
    acc_t* s = scores.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / q_tiles, q0 = (item % q_tiles) * kBlockQ;
      const int64_t rows = std::min(kBlockQ, L - q0);
      const HeadTiles<scalar_t> head(p, n);
      const auto q_scaled = head.scaled_query_rows(q0, rows, q_buf.data());
      for (int64_t tile_k0 = 0; tile_k0 < S; tile_k0 += kBlockK) {
        const ColumnSpan span = head.active_columns(q0, rows, tile_k0, std::min(kBlockK, S - tile_k0));
        if (span.empty()) continue;  // the output is zero-filled
        const int64_t k0 = tile_k0 + span.begin, cols = span.size();
        head.score_tile(q0, rows, k0, cols, q_scaled, keys.columns(head, k0, cols, rows), s, kBlockK);
        for (int64_t i = 0; i < rows; ++i) {
          const acc_t lse = lse_all[n * L + q0 + i];
          if (attended_nothing(lse)) continue;  // the row stays 0
          acc_t* s_row = s + i * kBlockK;
          exp_shifted_sum(s_row, cols, lse);
          scalar_t* w = weights + (n * L + q0 + i) * S + k0;
          for (int64_t j = 0; j < cols; ++j) w[j] = static_cast<scalar_t>(s_row[j]);
        }
      }
    }
  });
}

}  // namespace

void weights_cpu(const AttentionParams& p, at::ScalarType dtype, void* weights) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mha_ext_attention_weights_cpu",
                                  [&] { weights_kernel<scalar_t>(p, static_cast<scalar_t*>(weights)); });
}

}  // namespace mha_ext::cpu
