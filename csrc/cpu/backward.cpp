// Fused attention backward on the CPU. Work items are (kv batch, block of key tiles): each owns its rows
// of dK and dV outright, loops over the query heads sharing that K/V (GQA) and over the query tiles, and
// recomputes the probabilities from the saved LSE. dQ gets one partial sum per key block, added up in a
// fixed order afterwards; the kv batches whose score gradients add into one broadcast mask's slab share
// a work item: no atomics, no races, bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <string>

#include "cpu/dropout.h"
#include "cpu/kernels.h"
#include "cpu/key_tiles.h"
#include "cpu/vnni_tiles.h"

namespace mha_ext::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
// Enough work items to keep a many-core machine busy when there are few heads; the split depends only
// on the shapes, never on the thread count.
constexpr int64_t kMinWorkItems = 32;
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

// Key tiles per block of a work item's key tiles.
int64_t choose_tiles_per_block(int64_t kv_batch, int64_t k_tiles, int64_t dq_numel, int64_t acc_bytes) {
  const int64_t tiles = std::max<int64_t>(k_tiles, 1);
  int64_t blocks = std::clamp<int64_t>(ceil_div(kMinWorkItems, std::max<int64_t>(kv_batch, 1)), 1, tiles);
  while (blocks > 1 && (blocks - 1) * dq_numel * acc_bytes > kMaxPartialBytes) --blocks;
  return ceil_div(tiles, blocks);
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

// The backward's tile products in the accumulation type: S = (scale Q) K^T + masks, dP = dO V^T, and
// dV += P^T dO, dK += dS^T (scale Q), dQ += dS (scale K), on untransposed products (P and dS transposed here).
template <typename scalar_t>
class FloatGradProducts {
 public:
  using acc_t = acc_type<scalar_t>;
  explicit FloatGradProducts(const AttentionParams& p)
      : q_buf_(kBlockQ * p.E), do_buf_(kBlockQ * p.Ev), k_buf_(kBlockK * p.E), v_buf_(kBlockK * p.Ev),
        vt_buf_(p.Ev * kBlockK), pt_buf_(kBlockK * kBlockQ), dst_buf_(kBlockK * kBlockQ), keys_(p, kBlockK) {}

  void start_key_tile(const HeadTiles<scalar_t>& kv_head, int64_t k0, int64_t cols) {
    k_scaled_ = kv_head.scaled_key_rows(k0, cols, k_buf_.data());
    const auto v_rows = kv_head.value_rows(k0, cols, v_buf_.data());
    transpose(cols, kv_head.p.Ev, v_rows.data, v_rows.ld, vt_buf_.data(), kBlockK);
  }
  void start_query_tile(const HeadTiles<scalar_t>& head, int64_t q0, int64_t rows, const scalar_t* d_out,
                        int64_t d_out_stride) {
    q_scaled_ = head.scaled_query_rows(q0, rows, q_buf_.data());
    do_rows_ = rows_as_acc(d_out + q0 * d_out_stride, d_out_stride, rows, head.p.Ev, do_buf_.data());
  }
  // probs = S, dscores = dP.
  void scores_and_grad_probs(const HeadTiles<scalar_t>& head, const HeadTiles<scalar_t>& kv_head, int64_t q0,
                             int64_t rows, int64_t k0, int64_t cols, acc_t* probs, acc_t* dscores) {
    head.score_tile(q0, rows, k0, cols, q_scaled_, keys_.columns(kv_head, k0, cols, rows), probs, kBlockK);
    gemm(Trans::kNo, Trans::kNo, rows, cols, head.p.Ev, acc_t(1), do_rows_.data, do_rows_.ld, vt_buf_.data(),
         kBlockK, acc_t(0), dscores, kBlockK);
  }
  void accumulate(int64_t E, int64_t Ev, int64_t rows, int64_t cols, const acc_t* probs, const acc_t* dscores,
                  acc_t* dk, acc_t* dv, acc_t* dq) {
    transpose(rows, cols, probs, kBlockK, pt_buf_.data(), kBlockQ);
    transpose(rows, cols, dscores, kBlockK, dst_buf_.data(), kBlockQ);
    gemm(Trans::kNo, Trans::kNo, cols, Ev, rows, acc_t(1), pt_buf_.data(), kBlockQ, do_rows_.data, do_rows_.ld,
         acc_t(1), dv, Ev);
    gemm(Trans::kNo, Trans::kNo, cols, E, rows, acc_t(1), dst_buf_.data(), kBlockQ, q_scaled_.data, q_scaled_.ld,
         acc_t(1), dk, E);
    gemm(Trans::kNo, Trans::kNo, rows, E, cols, acc_t(1), dscores, kBlockK, k_scaled_.data, k_scaled_.ld, acc_t(1),
         dq, E);
  }
  void finish() {}

 private:
  Scratch<acc_t> q_buf_, do_buf_, k_buf_, v_buf_, vt_buf_, pt_buf_, dst_buf_;
  KeyTiles<acc_t> keys_;
  RowsView<acc_t> q_scaled_{nullptr, 0}, do_rows_{nullptr, 0}, k_scaled_{nullptr, 0};
};

// The same products on bf16 operands (gemm_bf16_vnni), accumulating in float: Q, dO read in place for S
// and dP; K^T, V^T and K packed in VNNI layout once per key tile, Q and dO once per query tile; P and
// scale * dS (the scale of dK and dQ) rounded to bf16, padded to even inner dimensions with zeros.
class Bf16GradProducts {
 public:
  using acc_t = float;
  using bf16 = c10::BFloat16;
  explicit Bf16GradProducts(const AttentionParams& p)
      : scale_(static_cast<float>(p.scale)), keys_t_(p.E * kBlockK), values_t_(p.Ev * kBlockK),
        key_pairs_(kBlockK * p.E), query_pairs_(kBlockQ * p.E), d_out_pairs_(kBlockQ * p.Ev),
        pt_f_(kBlockK * kBlockQ), dst_f_(kBlockK * kBlockQ), pt_(kBlockK * kBlockQ), dst_(kBlockK * kBlockQ),
        ds_(kBlockQ * kBlockK) {}

  void start_key_tile(const HeadTiles<bf16>& kv_head, int64_t k0, int64_t cols) {
    const AttentionParams& p = kv_head.p;
    const bf16* k = kv_head.k + k0 * p.key.row_stride;
    const bf16* v = kv_head.v + k0 * p.value.row_stride;
    transpose_pairs(cols, p.E, k, p.key.row_stride, keys_t_.data(), kBlockK);
    transpose_pairs(cols, p.Ev, v, p.value.row_stride, values_t_.data(), kBlockK);
    interleave_row_pairs(cols, p.E, k, p.key.row_stride, key_pairs_.data());
  }
  void start_query_tile(const HeadTiles<bf16>& head, int64_t q0, int64_t rows, const bf16* d_out,
                        int64_t d_out_stride) {
    q_ = head.q + q0 * head.p.query.row_stride;
    d_out_ = d_out + q0 * d_out_stride;
    d_out_stride_ = d_out_stride;
    interleave_row_pairs(rows, head.p.E, q_, head.p.query.row_stride, query_pairs_.data());
    interleave_row_pairs(rows, head.p.Ev, d_out_, d_out_stride, d_out_pairs_.data());
  }
  void scores_and_grad_probs(const HeadTiles<bf16>& head, const HeadTiles<bf16>&, int64_t q0, int64_t rows,
                             int64_t k0, int64_t cols, float* probs, float* dscores) {
    const AttentionParams& p = head.p;
    gemm_bf16_vnni(rows, cols, p.E, q_, p.query.row_stride, keys_t_.data(), kBlockK, /*add_to_c=*/false, probs,
                   kBlockK);
    head.apply_masks(q0, rows, k0, cols, probs, kBlockK, scale_);
    gemm_bf16_vnni(rows, cols, p.Ev, d_out_, d_out_stride_, values_t_.data(), kBlockK, /*add_to_c=*/false, dscores,
                   kBlockK);
  }
  void accumulate(int64_t E, int64_t Ev, int64_t rows, int64_t cols, const float* probs, const float* dscores,
                  float* dk, float* dv, float* dq) {
    const int64_t rows_even = rows + rows % 2, cols_even = cols + cols % 2;
    transpose(rows, cols, probs, kBlockK, pt_f_.data(), kBlockQ);
    transpose(rows, cols, dscores, kBlockK, dst_f_.data(), kBlockQ);
    for (int64_t j = 0; j < cols; ++j) {
      to_bf16_padded(pt_f_.data() + j * kBlockQ, rows, 1.f, pt_.data() + j * kBlockQ);
      to_bf16_padded(dst_f_.data() + j * kBlockQ, rows, scale_, dst_.data() + j * kBlockQ);
    }
    for (int64_t i = 0; i < rows; ++i) to_bf16_padded(dscores + i * kBlockK, cols, scale_, ds_.data() + i * kBlockK);
    gemm_bf16_vnni(cols, Ev, rows_even, pt_.data(), kBlockQ, d_out_pairs_.data(), Ev, /*add_to_c=*/true, dv, Ev);
    gemm_bf16_vnni(cols, E, rows_even, dst_.data(), kBlockQ, query_pairs_.data(), E, /*add_to_c=*/true, dk, E);
    gemm_bf16_vnni(rows, E, cols_even, ds_.data(), kBlockK, key_pairs_.data(), E, /*add_to_c=*/true, dq, E);
  }
  void finish() { release_tile_state(); }

 private:
  // dst[0:n] = bf16(scale * src[0:n]), and dst[n] = 0 when n is odd (the pad of an even inner dimension).
  static void to_bf16_padded(const float* src, int64_t n, float scale, bf16* dst) {
    row_ops().to_bf16(src, n, scale, reinterpret_cast<uint16_t*>(dst));
    if (n % 2 != 0) dst[n] = bf16(0.f);
  }

  float scale_;
  Scratch<bf16> keys_t_, values_t_, key_pairs_, query_pairs_, d_out_pairs_;
  Scratch<float> pt_f_, dst_f_;
  Scratch<bf16> pt_, dst_, ds_;
  const bf16* q_ = nullptr;
  const bf16* d_out_ = nullptr;
  int64_t d_out_stride_ = 0;
};

template <typename scalar_t, typename Products>
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
  const int64_t tiles_per_block = choose_tiles_per_block(kv_split.outer_count(), k_tiles, dq_numel, sizeof(acc_t));
  // Rounded up, the last blocks could otherwise be empty (4 tiles in 3 blocks: 2 + 2 + 0), each costing a
  // partial's memory, zeroing and summation for nothing.
  const int64_t kv_blocks = std::max<int64_t>(ceil_div(k_tiles, tiles_per_block), 1);
  // Each work item zeroes the rows of its own partial: first touched where they are used.
  at::Tensor dq_partials = kv_blocks > 1 ? at::empty({kv_blocks - 1, dq_numel}, acc_options) : at::Tensor();
  acc_t* grad_query = static_cast<acc_t*>(g.grad_query);
  const acc_t* lse_all = static_cast<const acc_t*>(p.lse);

  at::parallel_for(0, kv_split.outer_count() * kv_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> p_buf(kBlockQ * kBlockK), ds_buf(kBlockQ * kBlockK), dk_buf(kBlockK * E), dv_buf(kBlockK * Ev);
    Products products(p);
    acc_t* probs = p_buf.data();
    acc_t* dscores = ds_buf.data();
    acc_t* dk = dk_buf.data();
    acc_t* dv = dv_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t outer = item / kv_blocks, block = item % kv_blocks;
      acc_t* dq_base = block == 0 ? grad_query : dq_partials.data_ptr<acc_t>() + (block - 1) * dq_numel;
      if (block > 0) {
        for (int64_t inner = 0; inner < kv_split.inner_count(); ++inner) {
          acc_t* rows = dq_base + kv_split.flat(outer, inner) * G * L * E;
          std::fill(rows, rows + G * L * E, acc_t(0));
        }
      }
      const int64_t kt_end = std::min(k_tiles, (block + 1) * tiles_per_block);
      for (int64_t tile = block * tiles_per_block * kv_split.inner_count();
           tile < kt_end * kv_split.inner_count(); ++tile) {
        const int64_t kt = tile / kv_split.inner_count();
        const int64_t m = kv_split.flat(outer, tile % kv_split.inner_count());
        const int64_t k0 = kt * kBlockK, cols = std::min(kBlockK, S - k0);
        std::fill(dk, dk + cols * E, acc_t(0));
        std::fill(dv, dv + cols * Ev, acc_t(0));
        // Every query head of the group reads the same K/V rows.
        const HeadTiles<scalar_t> kv_head(p, m * G);
        products.start_key_tile(kv_head, k0, cols);
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t n = m * G + gi;
          const HeadTiles<scalar_t> head(p, n);
          const scalar_t* d_out = g.grad_out.ptr<scalar_t>(p.grid, n);
          acc_t* grad_scores = has_grad_scores ? g.template grad_scores_slab<acc_t>(n) : nullptr;
          const int64_t q_start = p.causal.first_query(k0) / kBlockQ * kBlockQ;
          for (int64_t q0 = q_start; q0 < L; q0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, L - q0);
            if (head.active_columns(q0, rows, k0, cols).empty()) continue;
            products.start_query_tile(head, q0, rows, d_out, g.grad_out.row_stride);
            products.scores_and_grad_probs(head, kv_head, q0, rows, k0, cols, probs, dscores);
            for (int64_t i = 0; i < rows; ++i) {
              acc_t* p_row = probs + i * kBlockK;
              acc_t* ds_row = dscores + i * kBlockK;
              const acc_t lse = lse_all[n * L + q0 + i];
              const acc_t d = delta[n * L + q0 + i];
              if (attended_nothing(lse)) {
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
                if (q0 + i + 1 < L) prefetch_segment(slab_row + S, cols * sizeof(acc_t), /*for_write=*/true);
                for (int64_t j = 0; j < cols; ++j) slab_row[j] += ds_row[j];
              }
            }
            products.accumulate(E, Ev, rows, cols, probs, dscores, dk, dv, dq_base + (n * L + q0) * E);
          }
        }
        scalar_t* grad_key = static_cast<scalar_t*>(g.grad_key) + (m * S + k0) * E;
        scalar_t* grad_value = static_cast<scalar_t*>(g.grad_value) + (m * S + k0) * Ev;
        for (int64_t r = 0; r < cols * E; ++r) grad_key[r] = static_cast<scalar_t>(dk[r]);
        for (int64_t r = 0; r < cols * Ev; ++r) grad_value[r] = static_cast<scalar_t>(dv[r]);
      }
    }
    products.finish();
  });

  if (kv_blocks > 1) {
    const acc_t* partials = dq_partials.data_ptr<acc_t>();
    at::parallel_for(0, dq_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < kv_blocks - 1; ++b)
        for (int64_t r = begin; r < end; ++r) grad_query[r] += partials[b * dq_numel + r];
    });
  }
}

// Why the backward does not multiply bf16 tiles as bf16 (Bf16GradProducts), in words; nullptr where it does.
const char* bf16_grad_products_unavailable(const AttentionParams& p, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return "the inputs are not bfloat16";
  // dP = dO V^T takes Ev as its inner dimension: it pairs up in VNNI layout only when even.
  if (p.Ev % 2 != 0) return "value's head dim Ev is odd (dP = dO V^T pairs its elements)";
  return vnni_tiles_unavailable(p);
}

}  // namespace

void backward_cpu(const AttentionGradParams& g, at::ScalarType dtype) {
  if (bf16_grad_products_unavailable(g.fwd, dtype) == nullptr) {
    backward_kernel<c10::BFloat16, Bf16GradProducts>(g);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mha_ext_attention_backward_cpu",
                                  [&] { backward_kernel<scalar_t, FloatGradProducts<scalar_t>>(g); });
}

KernelChoice explain_backward_cpu(const AttentionParams& p, at::ScalarType dtype) {
  KernelChoice choice;
  const char* no_bf16 = bf16_grad_products_unavailable(p, dtype);
  if (no_bf16 == nullptr) {
    choice.kernel = "bfloat16 tile products on oneDNN's brgemm (AMX / AVX512-BF16), operands packed in VNNI layout";
    choice.not_taken.emplace_back("float32 tile products", "bfloat16 inputs are multiplied as bfloat16 here");
  } else {
    choice.kernel = std::string("float32 tile products on ") + gemm_engine_description();
    choice.not_taken.emplace_back("bfloat16 tile products", no_bf16);
  }
  choice.tiles = std::to_string(kBlockQ) + " query rows x " + std::to_string(kBlockK) + " keys; work items own "
                 "blocks of key tiles of one kv head (dK, dV), dQ summed from one partial per block";
  return choice;
}

}  // namespace mha_ext::cpu
