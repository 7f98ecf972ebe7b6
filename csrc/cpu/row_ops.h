// The float row passes of the softmax (row maximum, shifted exponentials, the softmax gradient), in the
// widest vector ISA this CPU has: AVX-512 where present, else AVX2. The kernels are compiled for AVX2, so
// the AVX-512 versions live in their own file with per-function target attributes and are picked at run
// time, with AVX512-BF16's conversion instruction where present (setting cpu_isa, attention/settings.h:
// "avx2" forces the AVX2 versions, "avx512" AVX-512 without the BF16 instructions).
#pragma once

#include <cstdint>

namespace mha_ext::cpu {

struct RowOps {
  const char* isa;
  // max(x[0:n]); -inf for n == 0.
  float (*max)(const float* x, int64_t n);
  // x[j] *= scale for j < n; returns max(x[0:n]) after scaling.
  float (*scale_max)(float* x, int64_t n, float scale);
  // x[j] = scale * x[j] + add[j] for j < n; returns max(x[0:n]) after that. add is float, or the bit
  // patterns of c10::BFloat16 for the _bf16 version.
  float (*scale_add_max)(float* x, int64_t n, float scale, const float* add);
  float (*scale_add_max_bf16)(float* x, int64_t n, float scale, const uint16_t* add);
  // x[j] = exp(x[j] - shift) for j < n; returns their sum. exp(-inf) = 0.
  float (*exp_shifted_sum)(float* x, int64_t n, float shift);
  // out[j] = bf16(exp(scale * x[j] - shift)) (round to nearest even) for j < n; returns the sum of the float
  // values. x may be overwritten. out holds the bit patterns of c10::BFloat16. The AVX-512 versions compute exp to
  // a relative 3e-6 (far below bf16's 4e-3 rounding step) and may flush denormal results to 0.
  float (*exp_shifted_sum_bf16)(float* x, int64_t n, float scale, float shift, uint16_t* out);
  // out[j] = bf16(scale * x[j]), round to nearest even.
  void (*to_bf16)(const float* x, int64_t n, float scale, uint16_t* out);
  // Decode-sized products (a query row against key and value rows): sum(a[j] * b[j]) and y[j] += a * x[j]
  // for j < n, with b and x in float, or as the bit patterns of c10::BFloat16 for the _bf16 versions.
  float (*dot)(const float* a, const float* b, int64_t n);
  float (*dot_bf16)(const float* a, const uint16_t* b, int64_t n);
  void (*axpy)(int64_t n, float a, const float* x, float* y);
  void (*axpy_bf16)(int64_t n, float a, const uint16_t* x, float* y);
  // p[j] = exp(p[j] - lse) (the probabilities from the scores and the row's LSE), then
  // ds[j] = p[j] * (ds[j] - delta) (dP in, dS out).
  void (*softmax_grad)(float* p, float* ds, int64_t n, float lse, float delta);
};

// The row passes for this process, chosen on first use.
const RowOps& row_ops();

// The AVX-512 versions, or nullptr where this CPU (or its OS) lacks AVX-512 F/BW/DQ/VL; with
// with_bf16_instructions and an AVX512-BF16 CPU, the ones rounding to bf16 in hardware.
const RowOps* avx512_row_ops(bool with_bf16_instructions);

}  // namespace mha_ext::cpu
