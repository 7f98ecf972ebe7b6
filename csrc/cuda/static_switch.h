// Runtime values to compile-time template arguments. Each macro runs its trailing lambda with the
// constant (or type) bound under the given name.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

// scalar_t := the C++ type of a supported input dtype.
#define MHA_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                                        \
  [&] {                                                                                              \
    switch (DTYPE) {                                                                                 \
      case at::kHalf: {                                                                              \
        using TYPE_NAME = c10::Half;                                                                 \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::kBFloat16: {                                                                          \
        using TYPE_NAME = c10::BFloat16;                                                             \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::kFloat: {                                                                             \
        using TYPE_NAME = float;                                                                     \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::kDouble: {                                                                            \
        using TYPE_NAME = double;                                                                    \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      default:                                                                                       \
        TORCH_CHECK_TYPE(false, "mha_ext: the CUDA kernels take float16, bfloat16, float32 or float64, got ", \
                         DTYPE);                                                                     \
    }                                                                                                \
  }()

// CONST_NAME := the head-dim bucket (64, 128 or 256) that holds HEAD_DIM; the tile shapes depend on it.
// Callers have refused HEAD_DIM > 256 already.
#define MHA_HEADDIM_SWITCH(HEAD_DIM, CONST_NAME, ...) \
  [&] {                                              \
    if ((HEAD_DIM) <= 64) {                          \
      constexpr static int CONST_NAME = 64;          \
      return __VA_ARGS__();                          \
    } else if ((HEAD_DIM) <= 128) {                  \
      constexpr static int CONST_NAME = 128;         \
      return __VA_ARGS__();                          \
    } else {                                         \
      constexpr static int CONST_NAME = 256;         \
      return __VA_ARGS__();                          \
    }                                                \
  }()

// CONST_NAME := COND as a compile-time bool.
#define MHA_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
