// CUDA's fp16 type for kernels compiled by the emulator: c10::Half has the same bits and rounds floats to
// nearest even, as __float2half_rn does.
#pragma once

#include <c10/util/Half.h>

using __half = c10::Half;
inline __half __float2half_rn(float x) { return c10::Half(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
