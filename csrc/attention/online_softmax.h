// The online softmax of one query row, written once for every kernel: how a tile's scores update the
// row's running maximum and sum, and what the row's output scale and log-sum-exp are at the end.
//
// A row with nothing to attend (every score -inf: masked, or causally before the first key) ends with a
// sum of 0: its output is 0 and its LSE -inf, never NaN, and the backward gives it no gradient. A NaN or
// +inf score makes the row's sum NaN, and its output, LSE and gradients stay NaN, as torch's do.
#pragma once

#include "attention/numerics.h"

namespace mha_ext {

template <typename T>
struct SoftmaxUpdate {
  T max;      // the row's new running maximum
  T shift;    // what the tile's exponentials subtract: the new maximum, or 0 while it is -inf (exp(-inf) = 0)
  T rescale;  // the factor for the row's earlier sum and output: exp(old max - shift), 0 before any score
};

// The running maximum `old_max` meets a tile whose largest score is `tile_max` (a NaN tile maximum leaves
// the running one; the NaN reaches the sum through the tile's exponentials).
template <typename T>
MHA_HOST_DEVICE SoftmaxUpdate<T> online_softmax_update(T old_max, T tile_max) {
  const T new_max = tile_max > old_max ? tile_max : old_max;
  const T shift = new_max == neg_inf<T>() ? T(0) : new_max;
  return {new_max, shift, old_max == neg_inf<T>() ? T(0) : exp_acc(old_max - shift)};
}

// The factor turning the row's accumulated output into its attention output: 1 / sum, or 0 for a row that
// attended nothing.
template <typename T>
MHA_HOST_DEVICE T output_scale(T row_sum) {
  return row_sum == T(0) ? T(0) : T(1) / row_sum;
}

// The row's log-sum-exp: -inf for a row that attended nothing.
template <typename T>
MHA_HOST_DEVICE T row_lse(T row_max, T row_sum) {
  return row_sum == T(0) ? neg_inf<T>() : row_max + log_acc(row_sum);
}

// Whether a row with this LSE attended nothing: its probabilities and gradients are 0.
template <typename T>
MHA_HOST_DEVICE bool attended_nothing(T lse) {
  return lse == neg_inf<T>();
}

// A probability recomputed from its score and the row's LSE (the backward and the weights).
template <typename T>
MHA_HOST_DEVICE T probability(T score, T lse) {
  return attended_nothing(lse) ? T(0) : exp_acc(score - lse);
}

}  // namespace mha_ext
