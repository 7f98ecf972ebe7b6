// Fused attention backward on the CPU. Work items are (kv batch, block of key tiles): each owns its rows
// of dK and dV outright, loops over the query heads sharing that K/V (GQA) and over the query tiles, and
// recomputes the probabilities from the saved LSE. dQ gets one partial sum per key block, added up in a
// fixed order afterwards; the kv batches whose score gradients add into one broadcast mask's slab share
// a work item: no atomics, no races, bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention/entry.h"
#include "cpu/dropout.h"
#include "cpu/key_tiles.h"

namespace mha_ext::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
// Enough work items to keep a many-core machine busy when there are few heads; the split depends only
// on the shapes, never on the thread count.
constexpr int64_t kMinWorkItems = 32;
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

int64_t choose_kv_blocks(int64_t kv_batch, int64_t k_tiles, int64_t dq_numel, int64_t acc_bytes) {
  int64_t blocks = std::clamp<int64_t>(ceil_div(kMinWorkItems, std::max<int64_t>(kv_batch, 1)), 1,
                                       std::max<int64_t>(k_tiles, 1));
  while (blocks > 1 && (blocks - 1) * dq_numel * acc_bytes > kMaxPartialBytes) --blocks;
  return blocks;
}

// delta[r] = rowsum(dO * O) - dLSE: with P = softmax, dS = P * (dP - delta).
template <typename scalar_t, typename acc_t>
void compute_delta(const AttentionGradParams& g, acc_t* delta) {
  const AttentionParams& p = g.fwd;
  const int64_t L = p.L, Ev = p.Ev;
  at::parallel_for(0, p.grid.numel * L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / L, i = r % L;
      const scalar_t* d_out = g.grad_out.ptr<scalar_t>(p.grid, n) + i * g.grad_out.row_stride;
      const scalar_t* out = static_cast<const scalar_t*>(p.out) + r * Ev;
      acc_t sum = 0;
      for (int64_t e = 0; e < Ev; ++e) sum += static_cast<acc_t>(d_out[e]) * static_cast<acc_t>(out[e]);
      delta[r] = g.grad_lse == nullptr ? sum : sum - static_cast<const acc_t*>(g.grad_lse)[r];
    }
  });
}

template <typename scalar_t>
void backward_kernel(const AttentionGradParams& g) {
  using acc_t = acc_type<scalar_t>;
  const AttentionParams& p = g.fwd;
  const int64_t N = p.grid.numel, G = p.grid.group;
  const int64_t L = p.L, S = p.S, E = p.E, Ev = p.Ev;
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::Tensor delta_t = at::empty({N * L}, acc_options);
  acc_t* delta = delta_t.data_ptr<acc_t>();
  compute_delta<scalar_t>(g, delta);

  // kv batch-heads whose query heads add into one shared score-gradient slab run inside one work item, in
  // a fixed order, so no two threads ever add into the same slab.
  const bool has_grad_scores = g.grad_scores.data != nullptr;
  const GridSplit kv_split(p.grid, G > 1 ? p.grid.ndim - 1 : p.grid.ndim,
                           [&](int d) { return has_grad_scores && g.grad_scores.grid_strides[d] == 0; });
  const int64_t k_tiles = ceil_div(S, kBlockK);
  const int64_t dq_numel = N * L * E;
  const int64_t kv_blocks = choose_kv_blocks(kv_split.outer_count(), k_tiles, dq_numel, sizeof(acc_t));
  const int64_t tiles_per_block = ceil_div(k_tiles, kv_blocks);
  at::Tensor dq_partials = kv_blocks > 1 ? at::zeros({kv_blocks - 1, dq_numel}, acc_options) : at::Tensor();
  acc_t* grad_query = static_cast<acc_t*>(g.grad_query);
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);

  at::parallel_for(0, kv_split.outer_count() * kv_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> q_buf(kBlockQ * E), do_buf(kBlockQ * Ev), k_buf(kBlockK * E), v_buf(kBlockK * Ev),
        vt_buf(Ev * kBlockK), p_buf(kBlockQ * kBlockK), ds_buf(kBlockQ * kBlockK), pt_buf(kBlockK * kBlockQ),
        dst_buf(kBlockK * kBlockQ), dk_buf(kBlockK * E), dv_buf(kBlockK * Ev);
    KeyTiles<acc_t> keys(p, kBlockK);
    acc_t* probs = p_buf.data();
    acc_t* dscores = ds_buf.data();
    acc_t* values_t = vt_buf.data();
    acc_t* probs_t = pt_buf.data();
    acc_t* dscores_t = dst_buf.data();
    acc_t* dk = dk_buf.data();
    acc_t* dv = dv_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t outer = item / kv_blocks, block = item % kv_blocks;
      acc_t* dq_base = block == 0 ? grad_query : dq_partials.data_ptr<acc_t>() + (block - 1) * dq_numel;
      const int64_t kt_end = std::min(k_tiles, (block + 1) * tiles_per_block);
      for (int64_t tile = block * tiles_per_block * kv_split.inner_count();
           tile < kt_end * kv_split.inner_count(); ++tile) {
        const int64_t kt = tile / kv_split.inner_count();
        const int64_t m = kv_split.flat(outer, tile % kv_split.inner_count());
        const int64_t k0 = kt * kBlockK, cols = std::min(kBlockK, S - k0);
        std::fill(dk, dk + cols * E, acc_t(0));
        std::fill(dv, dv + cols * Ev, acc_t(0));
        // Every query head of the group reads the same K/V rows.
        const HeadView<scalar_t> kv_head(p, m * G);
        const auto k_scaled = kv_head.scaled_key_rows(k0, cols, k_buf.data());
        const auto v_rows = kv_head.value_rows(k0, cols, v_buf.data());
        transpose(cols, Ev, v_rows.data, v_rows.ld, values_t, kBlockK);
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t n = m * G + gi;
          const HeadView<scalar_t> head(p, n);
          const scalar_t* d_out = g.grad_out.ptr<scalar_t>(p.grid, n);
          acc_t* grad_scores = has_grad_scores ? g.template grad_scores_slab<acc_t>(n) : nullptr;
          const int64_t q_start = p.is_causal ? (k0 / kBlockQ) * kBlockQ : 0;
          for (int64_t q0 = q_start; q0 < L; q0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, L - q0);
            if (head.active_columns(q0, rows, k0, cols).empty()) continue;
            const auto q_scaled = head.scaled_query_rows(q0, rows, q_buf.data());
            const auto do_rows =
                rows_as_acc(d_out + q0 * g.grad_out.row_stride, g.grad_out.row_stride, rows, Ev, do_buf.data());
            head.score_tile(q0, rows, k0, cols, q_scaled, keys.columns(kv_head, k0, cols, rows), probs, kBlockK);
            // dP = dO V^T
            gemm(Trans::kNo, Trans::kNo, rows, cols, Ev, acc_t(1), do_rows.data, do_rows.ld, values_t, kBlockK,
                 acc_t(0), dscores, kBlockK);
            for (int64_t i = 0; i < rows; ++i) {
              acc_t* p_row = probs + i * kBlockK;
              acc_t* ds_row = dscores + i * kBlockK;
              const acc_t lse = lse_all[n * L + q0 + i];
              const acc_t d = delta[n * L + q0 + i];
              if (lse == kNegInf<acc_t>) {
                std::fill(p_row, p_row + cols, acc_t(0));  // nothing attended: no gradient
                std::fill(ds_row, ds_row + cols, acc_t(0));
              } else if (p.dropout.active) {
                exp_shifted_sum(p_row, cols, lse);
                // ds_row holds dO V^T, the gradient of the dropped probabilities Z * P / (1 - p):
                // dS = P * (Z * dP / (1 - p) - delta), and dV takes the dropped probabilities.
                const acc_t keep_scale = static_cast<acc_t>(p.dropout.keep_scale);
                for_each_dropout_decision(p.dropout, n, q0 + i, k0, cols, [&](int64_t j, bool kept) {
                  const acc_t z = kept ? keep_scale : acc_t(0);
                  ds_row[j] = p_row[j] * (ds_row[j] * z - d);
                  p_row[j] *= z;
                });
              } else {
                softmax_grad(p_row, ds_row, cols, lse, d);
              }
              if (grad_scores != nullptr) {
                acc_t* slab_row = grad_scores + (q0 + i) * S + k0;
                for (int64_t j = 0; j < cols; ++j) slab_row[j] += ds_row[j];
              }
            }
            // dV += P^T dO;  dK += dS^T (scale Q);  dQ += dS (scale K)
            transpose(rows, cols, probs, kBlockK, probs_t, kBlockQ);
            transpose(rows, cols, dscores, kBlockK, dscores_t, kBlockQ);
            gemm(Trans::kNo, Trans::kNo, cols, Ev, rows, acc_t(1), probs_t, kBlockQ, do_rows.data, do_rows.ld,
                 acc_t(1), dv, Ev);
            gemm(Trans::kNo, Trans::kNo, cols, E, rows, acc_t(1), dscores_t, kBlockQ, q_scaled.data, q_scaled.ld,
                 acc_t(1), dk, E);
            gemm(Trans::kNo, Trans::kNo, rows, E, cols, acc_t(1), dscores, kBlockK, k_scaled.data, k_scaled.ld, acc_t(1),
                 dq_base + (n * L + q0) * E, E);
          }
        }
        scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * S + k0) * E;
        scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * S + k0) * Ev;
        for (int64_t r = 0; r < cols * E; ++r) grad_key[r] = static_cast<scalar_t>(dk[r]);
        for (int64_t r = 0; r < cols * Ev; ++r) grad_value[r] = static_cast<scalar_t>(dv[r]);
      }
    }
  });

  if (kv_blocks > 1) {
    const acc_t* partials = dq_partials.data_ptr<acc_t>();
    at::parallel_for(0, dq_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < kv_blocks - 1; ++b)
        for (int64_t r = begin; r < end; ++r) grad_query[r] += partials[b * dq_numel + r];
    });
  }
}

void backward_cpu(const AttentionGradParams& g, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mha_ext_attention_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(g); });
}

}  // namespace

}  // namespace mha_ext::cpu

TORCH_LIBRARY_IMPL(mha_ext, CPU, m) {
  m.impl("attention_backward",
         [](const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, const at::Tensor& output,
            const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, bool is_causal, double scale,
            bool mask_requires_grad, bool bias_requires_grad, double dropout_p,
            const std::optional<at::Tensor>& rng_state) {
           return mha_ext::attention_backward(grad_output, q, k, v, mask, bias, output, lse, grad_lse, is_causal, scale,
                                              mask_requires_grad, bias_requires_grad, dropout_p, rng_state,
                                              mha_ext::cpu::backward_cpu, mha_ext::GradScoresLayout::kSharedWhereBroadcast);
         });
}
