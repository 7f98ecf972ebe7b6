// Fused attention forward on the CPU: each work item is one (batch, head, query tile); it streams the key
// tiles through an online softmax, so only O(tile) extra memory per thread is used, never O(L x S).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention/entry.h"
#include "cpu/dropout.h"
#include "cpu/key_tiles.h"

namespace mha_ext::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename scalar_t>
void forward_kernel(const AttentionParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = p.L, S = p.S, E = p.E, Ev = p.Ev;
  const WorkOrder order(p, ceil_div(L, kBlockQ));
  at::parallel_for(0, order.count(), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> q_buf(kBlockQ * E), v_buf(kBlockK * Ev), scores(kBlockQ * kBlockK), acc(kBlockQ * Ev),
        row_max_buf(kBlockQ), row_sum_buf(kBlockQ);
    KeyTiles<acc_t> keys(p, kBlockK);
    acc_t* s = scores.data();
    acc_t* o = acc.data();
    acc_t* m = row_max_buf.data();
    acc_t* l = row_sum_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, q_tile;
      order.item(item, n, q_tile);
      const int64_t q0 = q_tile * kBlockQ;
      const int64_t rows = std::min(kBlockQ, L - q0);
      const HeadView<scalar_t> head(p, n);
      const auto q_scaled = head.scaled_query_rows(q0, rows, q_buf.data());
      std::fill(m, m + rows, kNegInf<acc_t>);
      std::fill(l, l + rows, acc_t(0));
      std::fill(o, o + rows * Ev, acc_t(0));

      const int64_t k_end = p.is_causal ? std::min(S, q0 + rows) : S;
      for (int64_t tile_k0 = 0; tile_k0 < k_end; tile_k0 += kBlockK) {
        const ColumnSpan span = head.active_columns(q0, rows, tile_k0, std::min(kBlockK, k_end - tile_k0));
        if (span.empty()) continue;
        const int64_t k0 = tile_k0 + span.begin, cols = span.size();
        head.score_tile(q0, rows, k0, cols, q_scaled, keys.columns(head, k0, cols, rows), s, kBlockK);
        for (int64_t i = 0; i < rows; ++i) {
          acc_t* s_row = s + i * kBlockK;
          const acc_t new_max = std::max(m[i], row_max(s_row, cols));
          const acc_t shift = safe_shift(new_max);
          const acc_t rescale = m[i] == kNegInf<acc_t> ? acc_t(0) : std::exp(m[i] - shift);
          const acc_t tile_sum = exp_shifted_sum(s_row, cols, shift);
          // The normaliser sums the probabilities before dropout; only the values' weights are dropped.
          if (p.dropout.active) apply_dropout_row(p.dropout, n, q0 + i, k0, cols, s_row);
          if (rescale != acc_t(1)) {
            acc_t* o_row = o + i * Ev;
            for (int64_t e = 0; e < Ev; ++e) o_row[e] *= rescale;
          }
          l[i] = l[i] * rescale + tile_sum;
          m[i] = new_max;
        }
        const auto v_rows = head.value_rows(k0, cols, v_buf.data());
        gemm(Trans::kNo, Trans::kNo, rows, Ev, cols, acc_t(1), s, kBlockK, v_rows.data, v_rows.ld, acc_t(1), o, Ev);
      }

      scalar_t* out = static_cast<scalar_t*>(p.out) + (n * L + q0) * Ev;
      acc_t* lse = static_cast<acc_t*>(p.lse) + n * L + q0;
      for (int64_t i = 0; i < rows; ++i) {
        // A row with nothing to attend to has l == 0: its output is 0 and its LSE -inf.
        const acc_t inv = l[i] > acc_t(0) ? acc_t(1) / l[i] : acc_t(0);
        for (int64_t e = 0; e < Ev; ++e) out[i * Ev + e] = static_cast<scalar_t>(o[i * Ev + e] * inv);
        lse[i] = l[i] > acc_t(0) ? m[i] + std::log(l[i]) : kNegInf<acc_t>;
      }
    }
  });
}

void forward_cpu(const AttentionParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mha_ext_attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(p); });
}

}  // namespace

}  // namespace mha_ext::cpu

TORCH_LIBRARY_IMPL(mha_ext, CPU, m) {
  m.impl("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                 bool is_causal, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& rng_state) {
    return mha_ext::attention_forward(q, k, v, mask, bias, is_causal, scale, dropout_p, rng_state,
                                      mha_ext::cpu::forward_cpu);
  });
}
