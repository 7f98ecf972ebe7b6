// Building blocks shared by the CPU kernels: scratch memory, tile loads in the accumulation type,
// score tiles with their masks applied, and the tiling constants.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attention/head_pointers.h"
#include "attention/online_softmax.h"
#include "attention/params.h"
#include "cpu/gemm.h"
#include "cpu/row_ops.h"

namespace mha_ext::cpu {

// Per-thread scratch from torch's CPU allocator: 64-byte aligned, so BLAS takes the same code path on
// every call and results stay bitwise reproducible.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t numel)
      : tensor_(at::empty({std::max<int64_t>(numel, 1)},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))) {}
  T* data() { return tensor_.data_ptr<T>(); }

 private:
  at::Tensor tensor_;
};

// A (rows x cols) block of a row-major matrix in the accumulation type: the source itself when it already
// has that type, else a converted copy in `scratch`.
template <typename acc_t>
struct RowsView {
  const acc_t* data;
  int64_t ld;
};

template <typename scalar_t, typename acc_t>
RowsView<acc_t> rows_as_acc(const scalar_t* src, int64_t src_ld, int64_t rows, int64_t cols, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {src, src_ld};
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * src_ld, scratch + r * cols, cols);
    return {scratch, cols};
  }
}

// scale * (rows x cols block of src), converted to the accumulation type, always a copy in `scratch`.
template <typename scalar_t, typename acc_t>
RowsView<acc_t> scaled_rows_as_acc(const scalar_t* src, int64_t src_ld, int64_t rows, int64_t cols, acc_t scale,
                                   acc_t* scratch) {
  const RowsView<acc_t> rows_view = rows_as_acc(src, src_ld, rows, cols, scratch);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) scratch[r * cols + c] = rows_view.data[r * rows_view.ld + c] * scale;
  return {scratch, cols};
}

// Splits a flat index over the first `ndim` grid dims into an outer and an inner index: the dims that
// `is_inner(d)` picks vary fastest, in their own order, so items that differ only along them are adjacent.
class GridSplit {
 public:
  template <typename IsInner>
  GridSplit(const BatchGrid& grid, int ndim, IsInner is_inner) {
    int64_t flat_stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      Dims& dims = is_inner(d) ? inner_ : outer_;
      dims.size[dims.count] = grid.sizes[d];
      dims.flat_stride[dims.count] = flat_stride;
      ++dims.count;
      flat_stride *= grid.sizes[d];
    }
  }

  int64_t inner_count() const { return inner_.numel(); }
  int64_t outer_count() const { return outer_.numel(); }
  int64_t flat(int64_t outer, int64_t inner) const { return outer_.flat_index(outer) + inner_.flat_index(inner); }

 private:
  struct Dims {  // innermost first
    int count = 0;
    int64_t size[kMaxGridDims] = {};
    int64_t flat_stride[kMaxGridDims] = {};
    int64_t numel() const {
      int64_t n = 1;
      for (int d = 0; d < count; ++d) n *= size[d];
      return n;
    }
    int64_t flat_index(int64_t i) const {
      int64_t n = 0;
      for (int d = 0; d < count; ++d) {
        n += (i % size[d]) * flat_stride[d];
        i /= size[d];
      }
      return n;
    }
  };
  Dims outer_, inner_;
};

// The key operand of a score product: K's rows (op(B) = K^T, for products with fewer than kBlasMinRows
// query rows) or K^T itself (E x cols, an untransposed product).
template <typename acc_t>
struct KeyOperand {
  RowsView<acc_t> view;
  bool transposed;
};

// Granularity at which tiles are trimmed to the columns a bool mask leaves anything in.
constexpr int64_t kSpanChunk = 32;

struct ColumnSpan {
  int64_t begin;
  int64_t end;
  bool empty() const { return begin >= end; }
  int64_t size() const { return end - begin; }
};

// Prefetches `bytes` from `start` for reading, or for writing. A tile reads (or updates) one short
// segment per row of a (.., L, S) mask, bias or bias gradient, each row on other pages, more pages than
// the hardware prefetchers track: fetching the next row's segment while this one is used hides its misses.
inline void prefetch_segment(const void* start, int64_t bytes, bool for_write = false) {
  const char* p = static_cast<const char*>(start);
  for (int64_t b = 0; b < bytes; b += 64) {
    if (for_write) {
      __builtin_prefetch(p + b, 1);
    } else {
      __builtin_prefetch(p + b, 0);
    }
  }
}

// One (batch, query head) pair's operands, and its score tiles: masking.h's rule applied a row at a time
// with vector code, and the column spans of a tile that causality and the bool mask leave work in.
template <typename scalar_t>
struct HeadTiles : HeadPointers<scalar_t> {
  using HeadPointers<scalar_t>::HeadPointers;
  using HeadPointers<scalar_t>::p;
  using HeadPointers<scalar_t>::bool_mask;
  using HeadPointers<scalar_t>::mask_add;
  using HeadPointers<scalar_t>::bias;

  // Query or key rows times the softmax scale, in the accumulation type: the products that take them then
  // need no alpha, which the untransposed tile products (brgemm) lack.
  template <typename acc_t>
  RowsView<acc_t> scaled_query_rows(int64_t q0, int64_t rows, acc_t* scratch) const {
    return scaled_rows_as_acc(this->q + q0 * p.query.row_stride, p.query.row_stride, rows, p.E,
                              static_cast<acc_t>(p.scale), scratch);
  }
  template <typename acc_t>
  RowsView<acc_t> scaled_key_rows(int64_t k0, int64_t rows, acc_t* scratch) const {
    return scaled_rows_as_acc(this->k + k0 * p.key.row_stride, p.key.row_stride, rows, p.E,
                              static_cast<acc_t>(p.scale), scratch);
  }
  // Key or value rows [k0, k0 + rows) in the accumulation type.
  template <typename acc_t>
  RowsView<acc_t> key_rows(int64_t k0, int64_t rows, acc_t* scratch) const {
    return rows_as_acc(this->k + k0 * p.key.row_stride, p.key.row_stride, rows, p.E, scratch);
  }
  template <typename acc_t>
  RowsView<acc_t> value_rows(int64_t k0, int64_t rows, acc_t* scratch) const {
    return rows_as_acc(this->v + k0 * p.value.row_stride, p.value.row_stride, rows, p.Ev, scratch);
  }

  // The columns [begin, end) of the tile (rows from q0, columns from k0) outside which causality and the
  // bool mask leave no (query, key) pair, found in chunks of kSpanChunk columns: callers compute only
  // that span, and skip the tile when it is empty (padding, block-diagonal packing, causal corners).
  ColumnSpan active_columns(int64_t q0, int64_t rows, int64_t k0, int64_t cols) const {
    ColumnSpan span{0, cols};
    if (p.causal.active) span.end = std::clamp<int64_t>(p.causal.key_end(q0, rows, p.S) - k0, 0, cols);
    if (bool_mask == nullptr || span.empty()) return span;
    int64_t first = span.begin;
    while (first < span.end && !chunk_has_work(q0, rows, k0 + first, std::min(kSpanChunk, span.end - first)))
      first += kSpanChunk;
    if (first >= span.end) return {0, 0};
    int64_t last = first + ceil_div(span.end - first, kSpanChunk) * kSpanChunk;  // exclusive, chunk aligned
    while (last - kSpanChunk > first &&
           !chunk_has_work(q0, rows, k0 + last - kSpanChunk, std::min(kSpanChunk, span.end - (last - kSpanChunk))))
      last -= kSpanChunk;
    return {first, std::min(last, span.end)};
  }

  // scores (rows x cols, leading dim ld) = scale * Q[q0:] K[k0:]^T + additive masks, -inf where masked;
  // q_scaled from scaled_query_rows, keys the key columns [k0, k0 + cols) from KeyTiles.
  template <typename acc_t>
  void score_tile(int64_t q0, int64_t rows, int64_t k0, int64_t cols, RowsView<acc_t> q_scaled,
                  KeyOperand<acc_t> keys, acc_t* scores, int64_t ld) const {
    score_product(rows, cols, q_scaled, keys, scores, ld);
    apply_masks(q0, rows, k0, cols, scores, ld);
  }

  // scores = scale * Q K^T alone, for callers that add the masks themselves.
  template <typename acc_t>
  void score_product(int64_t rows, int64_t cols, RowsView<acc_t> q_scaled, KeyOperand<acc_t> keys, acc_t* scores,
                     int64_t ld) const {
    gemm(Trans::kNo, keys.transposed ? Trans::kNo : Trans::kYes, rows, cols, p.E, acc_t(1), q_scaled.data,
         q_scaled.ld, keys.view.data, keys.view.ld, acc_t(0), scores, ld);
  }

  // Whether one floating mask or bias is the only mask (no bool mask, no causality, no second one), read
  // with unit stride along keys in float or bf16: the forward then adds it in its row-maximum pass
  // (scale_add_max_row) instead of in apply_masks, a pass over the scores fewer.
  bool has_lone_addend() const {
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, c10::BFloat16>) {
      return false;
    } else {
      if (p.causal.active || bool_mask != nullptr || (mask_add != nullptr) == (bias != nullptr)) return false;
      return (mask_add != nullptr ? p.mask_add : p.bias).col_stride == 1;
    }
  }

  // s = scale * s + the lone addend's row `row` from column k0 (see has_lone_addend); returns max(s[0:n]).
  float scale_add_max_row(float* s, int64_t row, int64_t k0, int64_t n, float scale) const {
    const bool is_mask = mask_add != nullptr;
    const Operand& op = is_mask ? p.mask_add : p.bias;
    const AdditiveType type = is_mask ? p.mask_add_type : p.bias_type;
    const int64_t offset = op.element(row, k0);
    const void* base = is_mask ? mask_add : bias;
    if (row + 1 < p.L) prefetch_next_addend_row(type, base, op, offset, n);
    if (std::is_same_v<scalar_t, c10::BFloat16> && type == AdditiveType::kSameAsQuery) {
      return row_ops().scale_add_max_bf16(s, n, scale, reinterpret_cast<const uint16_t*>(
                                                           static_cast<const scalar_t*>(base) + offset));
    }
    return row_ops().scale_add_max(s, n, scale, static_cast<const float*>(base) + offset);
  }

  // scores = pre_scale * scores + additive masks, -inf where masked (the tile at rows q0, columns k0).
  template <typename acc_t>
  void apply_masks(int64_t q0, int64_t rows, int64_t k0, int64_t cols, acc_t* scores, int64_t ld,
                   acc_t pre_scale = acc_t(1)) const {
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* s = scores + i * ld;
      const int64_t row = q0 + i;
      if (pre_scale != acc_t(1)) {
        for (int64_t j = 0; j < cols; ++j) s[j] *= pre_scale;
      }
      add_additive(p.mask_add_type, mask_add, p.mask_add, row, k0, cols, s, row + 1 < p.L);
      add_additive(p.bias_type, bias, p.bias, row, k0, cols, s, row + 1 < p.L);
      if (bool_mask != nullptr) {
        const bool* m = bool_mask + p.bool_mask.element(row, k0);
        if (p.bool_mask.col_stride == 1) {
          // A select without a branch or a stride, so that it vectorises (a conditional store does not).
          for (int64_t j = 0; j < cols; ++j) s[j] = m[j] ? s[j] : neg_inf<acc_t>();
        } else {
          for (int64_t j = 0; j < cols; ++j)
            if (!m[j * p.bool_mask.col_stride]) s[j] = neg_inf<acc_t>();
        }
      }
      if (p.causal.active) {
        for (int64_t j = std::max<int64_t>(row + 1 + p.causal.offset - k0, 0); j < cols; ++j) s[j] = neg_inf<acc_t>();
      }
    }
  }

 private:
  // Whether the bool mask lets any row of the tile attend any of these columns.
  bool chunk_has_work(int64_t q0, int64_t rows, int64_t k0, int64_t cols) const {
    const Operand& m = p.bool_mask;
    // A mask broadcast along rows or columns needs only one of them read.
    const int64_t scan_rows = m.row_stride == 0 ? 1 : rows;
    const int64_t scan_cols = m.col_stride == 0 ? 1 : cols;
    for (int64_t i = 0; i < scan_rows; ++i) {
      const bool* row = bool_mask + m.element(q0 + i, k0);
      if (m.col_stride == 1) {
        if (std::find(row, row + scan_cols, true) != row + scan_cols) return true;
      } else {
        for (int64_t j = 0; j < scan_cols; ++j)
          if (row[j * m.col_stride]) return true;
      }
    }
    return false;
  }

  template <typename src_t, typename acc_t>
  static void add_row(const src_t* src, int64_t col_stride, int64_t cols, acc_t* s) {
    if (col_stride == 1) {
      for (int64_t j = 0; j < cols; ++j) s[j] += static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) s[j] += static_cast<acc_t>(src[j * col_stride]);
    }
  }

  // Prefetches the segment of `cols` elements one row after element `offset` of an additive operand read
  // with unit column stride (see prefetch_segment); nothing for one broadcast along rows.
  static void prefetch_next_addend_row(AdditiveType type, const void* base, const Operand& op, int64_t offset,
                                       int64_t cols) {
    if (op.row_stride == 0 || op.col_stride != 1) return;
    const int64_t element_bytes = type == AdditiveType::kSameAsQuery ? sizeof(scalar_t) : sizeof(float);
    prefetch_segment(static_cast<const char*>(base) + (offset + op.row_stride) * element_bytes, cols * element_bytes);
  }

  // s += the additive operand's row `row` from column k0; prefetches the next row's segment if has_next_row.
  template <typename acc_t>
  static void add_additive(AdditiveType type, const void* base, const Operand& op, int64_t row, int64_t k0,
                           int64_t cols, acc_t* s, bool has_next_row) {
    if (type == AdditiveType::kNone) return;
    const int64_t offset = op.element(row, k0);
    if (has_next_row) prefetch_next_addend_row(type, base, op, offset, cols);
    if (type == AdditiveType::kSameAsQuery) {
      add_row(static_cast<const scalar_t*>(base) + offset, op.col_stride, cols, s);
    } else {
      add_row(static_cast<const float*>(base) + offset, op.col_stride, cols, s);
    }
  }
};

// x[j] = exp(x[j] - shift) for j < n; returns the sum. exp(-inf) = 0.
inline float exp_shifted_sum(float* x, int64_t n, float shift) { return row_ops().exp_shifted_sum(x, n, shift); }

inline double exp_shifted_sum(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

inline float row_max(const float* x, int64_t n) { return row_ops().max(x, n); }

inline double row_max(const double* x, int64_t n) {
  return at::vec::reduce_all<double>([](auto& a, auto& b) { return at::vec::maximum(a, b); }, x, n);
}

// p[j] = exp(p[j] - lse), then ds[j] = p[j] * (ds[j] - delta): the probabilities and dS of one row.
inline void softmax_grad(float* p, float* ds, int64_t n, float lse, float delta) {
  row_ops().softmax_grad(p, ds, n, lse, delta);
}

inline void softmax_grad(double* p, double* ds, int64_t n, double lse, double delta) {
  exp_shifted_sum(p, n, lse);
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

}  // namespace mha_ext::cpu
