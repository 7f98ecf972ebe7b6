// Arithmetic every backend shares: the accumulation type of an input type, exp and log in it, and a
// rounded-up division.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention/host_device.h"

namespace mha_ext {

// float for float, bfloat16 and float16 inputs; double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

MHA_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The C library's functions, which host and device code both have.
MHA_HOST_DEVICE inline float exp_acc(float x) { return expf(x); }
MHA_HOST_DEVICE inline double exp_acc(double x) { return exp(x); }
MHA_HOST_DEVICE inline float log_acc(float x) { return logf(x); }
MHA_HOST_DEVICE inline double log_acc(double x) { return log(x); }

template <typename T>
MHA_HOST_DEVICE constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

}  // namespace mha_ext
