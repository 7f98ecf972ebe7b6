// The kernel-facing description of one attention call: plain data, usable from host and device code.
//
// Every operand is addressed on one "batch grid": the leading dims of query, key and value broadcast, with
// the head dim split into (kv_heads, group) so that grouped-query attention needs no division and no
// repeated K/V: query head h = kv_head * group + g, and key/value simply have stride 0 along `group`.
// Broadcast inputs and masks get stride 0 along the dims they broadcast over, so nothing is ever expanded
// in memory.
#pragma once

#include <cstdint>

#include "attention/causal.h"
#include "attention/host_device.h"
#include "attention/philox.h"

namespace mha_ext {

constexpr int kMaxGridDims = 8;

struct BatchGrid {
  int ndim = 0;
  int64_t sizes[kMaxGridDims] = {};
  int64_t numel = 1;   // product of sizes: the number of (batch, query head) pairs
  int64_t group = 1;   // sizes[ndim - 1]: query heads per key/value head
};

// A (grid..., rows, cols) view of a tensor; strides in elements.
struct Operand {
  const void* data = nullptr;
  int64_t grid_strides[kMaxGridDims] = {};
  int64_t row_stride = 0;
  int64_t col_stride = 1;

  MHA_HOST_DEVICE int64_t offset(const BatchGrid& grid, int64_t flat) const {
    int64_t off = 0;
    for (int d = grid.ndim - 1; d >= 0; --d) {
      const int64_t size = grid.sizes[d];
      off += (flat % size) * grid_strides[d];
      flat /= size;
    }
    return off;
  }
  template <typename T>
  MHA_HOST_DEVICE const T* ptr(const BatchGrid& grid, int64_t flat) const {
    return static_cast<const T*>(data) + offset(grid, flat);
  }
  // Offset of element (i, j) within one batch-head's (rows, cols) slab.
  MHA_HOST_DEVICE int64_t element(int64_t i, int64_t j) const { return i * row_stride + j * col_stride; }
};

enum class AdditiveType : int { kNone = 0, kSameAsQuery = 1, kFloat32 = 2 };

struct AttentionParams {
  BatchGrid grid;
  int64_t L = 0, S = 0, E = 0, Ev = 0;
  double scale = 1.0;
  CausalRule causal;

  Operand query, key, value;  // col_stride == 1
  bool has_bool_mask = false;
  Operand bool_mask;          // bool, True = attend
  // Up to two floating tensors added to the scaled scores: a floating attn_mask and attn_bias.
  AdditiveType mask_add_type = AdditiveType::kNone;
  Operand mask_add;
  AdditiveType bias_type = AdditiveType::kNone;
  Operand bias;

  // Attention dropout, applied to the probabilities after the softmax (inactive when dropout_p == 0).
  DropoutRule dropout;

  void* out = nullptr;   // contiguous (grid, L, Ev), query's dtype
  void* lse = nullptr;   // contiguous (grid, L), accumulation type (float32; float64 for float64 inputs)
};

struct AttentionGradParams {
  AttentionParams fwd;        // out/lse point to the saved forward results
  Operand grad_out;           // (grid, L, Ev), col_stride == 1
  const void* grad_lse = nullptr;  // contiguous (grid, L), accumulation type, or null
  // Outputs. The accumulating ones are in the accumulation type (float32, or float64 for float64 inputs);
  // grad_key/grad_value are in the query's dtype, one row per (kv batch, key position).
  void* grad_query = nullptr;   // contiguous (grid, L, E), zero-filled, accumulation type
  void* grad_key = nullptr;     // contiguous (grid / group, S, E)
  void* grad_value = nullptr;   // contiguous (grid / group, S, Ev)
  // d loss / d scores, for a floating mask or bias that needs a gradient (data null otherwise): zero-filled,
  // accumulation type, (grid, L, S) with row stride S and column stride 1. Along the grid dims that every
  // such mask broadcasts over the stride may be 0: those batch-heads add into one shared (L, S) slab, and
  // the kernel must add them without races (GradScoresLayout in entry.h says which kernels get that).
  Operand grad_scores;

  // The (L, S) slab that batch-head n adds its score gradient into.
  template <typename T>
  MHA_HOST_DEVICE T* grad_scores_slab(int64_t n) const {
    return static_cast<T*>(const_cast<void*>(grad_scores.data)) + grad_scores.offset(fwd.grid, n);
  }
};

}  // namespace mha_ext
