// CUDA's bf16 type for kernels compiled by the emulator: c10::BFloat16 has the same bits and rounds floats
// to nearest even, as __float2bfloat16_rn does.
#pragma once

#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
