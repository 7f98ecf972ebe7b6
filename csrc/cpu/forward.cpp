// Fused attention forward on the CPU: each work item is one (batch, head, query tile); it streams the key
// tiles through an online softmax, so only O(tile) extra memory per thread is used, never O(L x S).
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
constexpr int64_t kBlockK = 512;

// The `drop` of the products' probabilities() without dropout.
struct NoDropout {
  template <typename T>
  void operator()(T*) const {}
};

// The forward's two tile products, S = scale Q K^T + masks and O += P V, in the accumulation type: Q scaled
// into a copy, K^T from KeyTiles, P in place in the score tile. Decode-sized bf16 tiles (fewer than
// kBlasMinRows query rows) read the K/V rows themselves instead of a converted copy.
template <typename scalar_t>
class FloatTileProducts {
 public:
  using acc_t = acc_type<scalar_t>;
  FloatTileProducts(const AttentionParams& p, int64_t tile_rows)
      : q_buf_(tile_rows * p.E), v_buf_(kBlockK * p.Ev), keys_(p, kBlockK) {}

  void start_query_tile(const HeadTiles<scalar_t>& head, int64_t q0, int64_t rows) {
    q_scaled_ = head.scaled_query_rows(q0, rows, q_buf_.data());
    lone_addend_ = head.has_lone_addend();
  }
  void scores(const HeadTiles<scalar_t>& head, int64_t q0, int64_t rows, int64_t k0, int64_t cols, acc_t* s) {
    if constexpr (kBf16) {
      if (rows < kBlasMinRows) {
        // Decode: dot products straight from the bf16 key rows, no converted copy of the tile.
        const int64_t key_stride = head.p.key.row_stride;
        const RowOps& ops = row_ops();  // once, out of the loop over the keys
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j)
            s[i * kBlockK + j] = ops.dot_bf16(q_scaled_.data + i * q_scaled_.ld, bits(head.k + (k0 + j) * key_stride),
                                              head.p.E);
        if (!lone_addend_) head.apply_masks(q0, rows, k0, cols, s, kBlockK);
        return;
      }
    }
    const KeyOperand<acc_t> keys = keys_.columns(head, k0, cols, rows);
    if (lone_addend_) {
      head.score_product(rows, cols, q_scaled_, keys, s, kBlockK);  // the addend comes with the row maximum
    } else {
      head.score_tile(q0, rows, k0, cols, q_scaled_, keys, s, kBlockK);
    }
  }
  acc_t row_max_of_scores(const HeadTiles<scalar_t>& head, int64_t row, int64_t k0, acc_t* s_row, int64_t cols) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (lone_addend_) return head.scale_add_max_row(s_row, row, k0, cols, 1.f);
    }
    return row_max(s_row, cols);
  }
  // s_row = exp(s_row - shift), then `drop` applied to it; returns the sum before dropout.
  template <typename Drop>
  acc_t probabilities(acc_t* s_row, int64_t, int64_t cols, acc_t shift, Drop drop) {
    const acc_t sum = exp_shifted_sum(s_row, cols, shift);
    drop(s_row);
    return sum;
  }
  void accumulate_values(const HeadTiles<scalar_t>& head, int64_t rows, int64_t k0, int64_t cols, const acc_t* s,
                         acc_t* o) {
    if constexpr (kBf16) {
      if (rows < kBlasMinRows) {
        const int64_t value_stride = head.p.value.row_stride, Ev = head.p.Ev;
        const RowOps& ops = row_ops();
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j)
            ops.axpy_bf16(Ev, s[i * kBlockK + j], bits(head.v + (k0 + j) * value_stride), o + i * Ev);
        return;
      }
    }
    const auto v_rows = head.value_rows(k0, cols, v_buf_.data());
    gemm(Trans::kNo, Trans::kNo, rows, head.p.Ev, cols, acc_t(1), s, kBlockK, v_rows.data, v_rows.ld, acc_t(1), o,
         head.p.Ev);
  }
  void finish() {}

 private:
  static constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  static const uint16_t* bits(const scalar_t* x) { return reinterpret_cast<const uint16_t*>(x); }

  Scratch<acc_t> q_buf_, v_buf_;
  KeyTiles<acc_t> keys_;
  RowsView<acc_t> q_scaled_{nullptr, 0};
  bool lone_addend_ = false;
};

// The same products on bf16 operands (AMX / AVX512-BF16 through gemm_bf16_vnni), accumulating in float:
// Q read in place, the scale applied to the float scores, K^T and V in VNNI layout from VnniKeyValueTiles,
// and P rounded to bf16 (as torch's own CPU kernel does), its columns padded to an even count.
class Bf16TileProducts {
 public:
  using acc_t = float;
  Bf16TileProducts(const AttentionParams& p, int64_t tile_rows)
      : probs_(tile_rows * kBlockK),
        tiles_(p, kBlockK),
        scale_(static_cast<float>(p.scale)),
        has_masks_(p.causal.active || p.has_bool_mask || p.mask_add_type != AdditiveType::kNone ||
                   p.bias_type != AdditiveType::kNone),
        scale_in_exp_(!has_masks_ && !p.dropout.active && scale_ > 0.f) {}

  void start_query_tile(const HeadTiles<c10::BFloat16>& head, int64_t q0, int64_t) {
    q_ = head.q + q0 * head.p.query.row_stride;
    lone_addend_ = head.has_lone_addend();
  }
  void scores(const HeadTiles<c10::BFloat16>& head, int64_t q0, int64_t rows, int64_t k0, int64_t cols, float* s) {
    operands_ = tiles_.columns(head, k0, cols);
    gemm_bf16_vnni(rows, cols, head.p.E, q_, head.p.query.row_stride, operands_.keys_t, operands_.keys_ld,
                   /*add_to_c=*/false, s, kBlockK);
    // Without masks the exponentials' pass applies the scale (or, with dropout, the row maximum's pass);
    // with a lone addend the row maximum's pass adds it and the scale: a pass fewer either way.
    if (has_masks_ && !lone_addend_) head.apply_masks(q0, rows, k0, cols, s, kBlockK, scale_);
  }
  float row_max_of_scores(const HeadTiles<c10::BFloat16>& head, int64_t row, int64_t k0, float* s_row,
                          int64_t cols) const {
    if (lone_addend_) return head.scale_add_max_row(s_row, row, k0, cols, scale_);
    // Rounding is monotonic: with scale > 0, max(scale * s) = scale * max(s) exactly.
    if (scale_in_exp_) return row_max(s_row, cols) * scale_;
    return has_masks_ ? row_max(s_row, cols) : row_ops().scale_max(s_row, cols, scale_);
  }
  template <typename Drop>
  float probabilities(float* s_row, int64_t i, int64_t cols, float shift, Drop drop) {
    uint16_t* p_row = reinterpret_cast<uint16_t*>(probs_.data() + i * kBlockK);
    float sum;
    if constexpr (std::is_same_v<Drop, NoDropout>) {
      sum = row_ops().exp_shifted_sum_bf16(s_row, cols, scale_in_exp_ ? scale_ : 1.f, shift, p_row);
    } else {
      sum = exp_shifted_sum(s_row, cols, shift);
      drop(s_row);
      row_ops().to_bf16(s_row, cols, 1.f, p_row);
    }
    if (cols % 2 != 0) p_row[cols] = 0;  // the pad column of the even inner dimension
    return sum;
  }
  void accumulate_values(const HeadTiles<c10::BFloat16>& head, int64_t rows, int64_t, int64_t cols, const float*,
                         float* o) {
    gemm_bf16_vnni(rows, head.p.Ev, cols + cols % 2, probs_.data(), kBlockK, operands_.values, head.p.Ev,
                   /*add_to_c=*/true, o, head.p.Ev);
  }
  void finish() { release_tile_state(); }

 private:
  Scratch<c10::BFloat16> probs_;
  VnniKeyValueTiles tiles_;
  float scale_;
  bool has_masks_;
  bool scale_in_exp_;  // the scores stay unscaled until exp_shifted_sum_bf16
  bool lone_addend_ = false;
  const c10::BFloat16* q_ = nullptr;
  VnniKeyValueTiles::Operands operands_{};
};

// Query rows per tile and query tiles per work item.
struct QueryTiling {
  int64_t tile_rows;
  int64_t tiles_per_item;
};

// A kv head's K and V, in the accumulation type, above this size stream from L3 for every query tile when
// there is more than one key tile (half of a 2 MiB L2).
constexpr int64_t kCachedKeyValueBytes = int64_t(1) << 20;
constexpr int64_t kWideTileHeadDim = 256;

// 64-row tiles by default. Float products at head dims from 256 without causality take 256-row tiles:
// the larger row count amortises each product's pass over its 0.5-1 MB K^T / V operand (MKL packs it per
// call, brgemm re-reads it from L2 per row block); causal 256-row tiles would compute too much of their
// diagonal's upper triangle. Where K and V leave L2 (above), a work item takes 4 query tiles through each
// key tile in turn, reading them a quarter as often; each tile keeps its own causal span.
QueryTiling choose_query_tiling(const AttentionParams& p, bool float_products, int64_t acc_bytes) {
  if (float_products && !p.causal.active && std::max(p.E, p.Ev) >= kWideTileHeadDim) return {4 * kBlockQ, 1};
  if (p.S > kBlockK && p.S * (p.E + p.Ev) * acc_bytes > kCachedKeyValueBytes) return {kBlockQ, 4};
  return {kBlockQ, 1};
}

template <typename scalar_t, typename Products>
void forward_kernel(const AttentionParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = p.L, S = p.S, Ev = p.Ev;
  // Work items in (batch-head, query tiles) order: consecutive items of a thread read the same kv head, whose
  // packed keys it keeps (KeyTiles, VnniKeyValueTiles).
  const QueryTiling tiling =
      choose_query_tiling(p, !std::is_same_v<Products, Bf16TileProducts>, sizeof(acc_t));
  const int64_t tile_rows = tiling.tile_rows, group_rows = tile_rows * tiling.tiles_per_item;
  const int64_t q_groups = ceil_div(L, group_rows);
  at::parallel_for(0, p.grid.numel * q_groups, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scores(tile_rows * kBlockK), acc(group_rows * Ev), row_max_buf(group_rows), row_sum_buf(group_rows);
    Products products(p, tile_rows);
    acc_t* s = scores.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / q_groups, g0 = (item % q_groups) * group_rows;
      const int64_t g_rows = std::min(group_rows, L - g0);
      const HeadTiles<scalar_t> head(p, n);
      std::fill(row_max_buf.data(), row_max_buf.data() + g_rows, neg_inf<acc_t>());
      std::fill(row_sum_buf.data(), row_sum_buf.data() + g_rows, acc_t(0));
      std::fill(acc.data(), acc.data() + g_rows * Ev, acc_t(0));

      const int64_t k_end = p.causal.key_end(g0, g_rows, S);
      int64_t started_q0 = -1;  // the query tile the products hold: once per item without groups
      for (int64_t tile_k0 = 0; tile_k0 < k_end; tile_k0 += kBlockK) {
        for (int64_t q0 = g0; q0 < g0 + g_rows; q0 += tile_rows) {
          const int64_t rows = std::min(tile_rows, g0 + g_rows - q0);
          const ColumnSpan span = head.active_columns(q0, rows, tile_k0, std::min(kBlockK, k_end - tile_k0));
          if (span.empty()) continue;
          const int64_t k0 = tile_k0 + span.begin, cols = span.size();
          acc_t* m = row_max_buf.data() + (q0 - g0);
          acc_t* l = row_sum_buf.data() + (q0 - g0);
          acc_t* o = acc.data() + (q0 - g0) * Ev;
          if (q0 != started_q0) {
            products.start_query_tile(head, q0, rows);
            started_q0 = q0;
          }
          products.scores(head, q0, rows, k0, cols, s);
          for (int64_t i = 0; i < rows; ++i) {
            acc_t* s_row = s + i * kBlockK;
            const SoftmaxUpdate<acc_t> update =
                online_softmax_update(m[i], products.row_max_of_scores(head, q0 + i, k0, s_row, cols));
            // The normaliser sums the probabilities before dropout; only the values' weights are dropped.
            const acc_t tile_sum =
                p.dropout.active
                    ? products.probabilities(s_row, i, cols, update.shift,
                                             [&](acc_t* row) { apply_dropout_row(p.dropout, n, q0 + i, k0, cols, row); })
                    : products.probabilities(s_row, i, cols, update.shift, NoDropout{});
            if (update.rescale != acc_t(1)) {
              acc_t* o_row = o + i * Ev;
              for (int64_t e = 0; e < Ev; ++e) o_row[e] *= update.rescale;
            }
            l[i] = l[i] * update.rescale + tile_sum;
            m[i] = update.max;
          }
          products.accumulate_values(head, rows, k0, cols, s, o);
        }
      }

      scalar_t* out = static_cast<scalar_t*>(p.out) + (n * L + g0) * Ev;
      acc_t* lse = static_cast<acc_t*>(p.lse) + n * L + g0;
      const acc_t* m = row_max_buf.data();
      const acc_t* l = row_sum_buf.data();
      const acc_t* o = acc.data();
      for (int64_t i = 0; i < g_rows; ++i) {
        const acc_t scale = output_scale(l[i]);
        for (int64_t e = 0; e < Ev; ++e) out[i * Ev + e] = static_cast<scalar_t>(o[i * Ev + e] * scale);
        lse[i] = row_lse(m[i], l[i]);
      }
    }
    products.finish();
  });
}

// Why the forward does not multiply bf16 tiles as bf16 (Bf16TileProducts), in words; nullptr where it does.
const char* bf16_products_unavailable(const AttentionParams& p, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return "the inputs are not bfloat16";
  // Decode-sized queries (fewer than kBlasMinRows rows) stream K and V once instead of packing them.
  if (p.L < kBlasMinRows) return "a decode-sized query (L < 4) reads K and V once, unpacked";
  return vnni_tiles_unavailable(p);
}

}  // namespace

void forward_cpu(const AttentionParams& p, at::ScalarType dtype) {
  if (bf16_products_unavailable(p, dtype) == nullptr) {
    forward_kernel<c10::BFloat16, Bf16TileProducts>(p);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mha_ext_attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t, FloatTileProducts<scalar_t>>(p); });
}

KernelChoice explain_forward_cpu(const AttentionParams& p, at::ScalarType dtype) {
  KernelChoice choice;
  const char* no_bf16 = bf16_products_unavailable(p, dtype);
  const bool decode = p.L < kBlasMinRows;
  if (no_bf16 == nullptr) {
    choice.kernel = "bfloat16 tile products on oneDNN's brgemm (AMX / AVX512-BF16), K^T and V packed in VNNI layout";
  } else if (decode) {
    choice.kernel = "decode: vectorised dot products and row updates over the K/V rows, which are read once";
  } else {
    choice.kernel = std::string("float32 tile products on ") + gemm_engine_description() +
                    (dtype == at::kFloat || dtype == at::kDouble ? "" : ", 16-bit inputs widened to float32");
  }
  const QueryTiling tiling = choose_query_tiling(p, no_bf16 != nullptr, dtype == at::kDouble ? 8 : 4);
  choice.tiles = std::to_string(tiling.tile_rows) + " query rows x " + std::to_string(kBlockK) + " keys, " +
                 std::to_string(tiling.tiles_per_item) + " query tile(s) per work item; key tiles that causality "
                 "or the bool mask leave empty are skipped, the rest trimmed to 32-key chunks";
  if (no_bf16 != nullptr) {
    choice.not_taken.emplace_back("bfloat16 tile products", no_bf16);
  } else {
    choice.not_taken.emplace_back("float32 tile products", "bfloat16 inputs are multiplied as bfloat16 here");
  }
  if (!decode) choice.not_taken.emplace_back("decode path", "L >= 4: tiles are packed once and multiplied by GEMMs");
  return choice;
}

}  // namespace mha_ext::cpu
