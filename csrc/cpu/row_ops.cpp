// The AVX2 row passes (at::vec, compiled with the kernels' flags) and the choice between them and the
// AVX-512 ones.
#include "cpu/row_ops.h"
#include "attention/settings.h"
#include "cpu/vec_dot.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace mha_ext::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

float max_avx2(const float* x, int64_t n) {
  if (n == 0) return -std::numeric_limits<float>::infinity();
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

float scale_max_avx2(float* x, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  return max_avx2(x, n);
}

float scale_add_max_avx2(float* x, int64_t n, float scale, const float* add) {
  for (int64_t j = 0; j < n; ++j) x[j] = scale * x[j] + add[j];
  return max_avx2(x, n);
}

float scale_add_max_bf16_avx2(float* x, int64_t n, float scale, const uint16_t* add) {
  const auto* addend = reinterpret_cast<const c10::BFloat16*>(add);
  for (int64_t j = 0; j < n; ++j) x[j] = scale * x[j] + static_cast<float>(addend[j]);
  return max_avx2(x, n);
}

float exp_shifted_sum_avx2(float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vshift).exp_u20();
    e.store(x + j);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

void to_bf16_avx2(const float* x, int64_t n, float scale, uint16_t* out) {
  auto* dst = reinterpret_cast<c10::BFloat16*>(out);
  for (int64_t j = 0; j < n; ++j) dst[j] = c10::BFloat16(scale * x[j]);
}

float exp_shifted_sum_bf16_avx2(float* x, int64_t n, float scale, float shift, uint16_t* out) {
  if (scale != 1.f) {
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
  const float sum = exp_shifted_sum_avx2(x, n, shift);
  to_bf16_avx2(x, n, 1.f, out);
  return sum;
}

float dot_avx2(const float* a, const float* b, int64_t n) { return vec_dot(n, a, b); }

float dot_bf16_avx2(const float* a, const uint16_t* b, int64_t n) {
  const auto* bf = reinterpret_cast<const c10::BFloat16*>(b);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * static_cast<float>(bf[j]);
  return sum;
}

void axpy_avx2(int64_t n, float a, const float* x, float* y) { vec_axpy(n, a, x, y); }

void axpy_bf16_avx2(int64_t n, float a, const uint16_t* x, float* y) {
  const auto* xf = reinterpret_cast<const c10::BFloat16*>(x);
  for (int64_t j = 0; j < n; ++j) y[j] += a * static_cast<float>(xf[j]);
}

void softmax_grad_avx2(float* p, float* ds, int64_t n, float lse, float delta) {
  exp_shifted_sum_avx2(p, n, lse);
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

#if defined(__AVX2__)
constexpr const char* kBaseIsa = "avx2";
#else
constexpr const char* kBaseIsa = "baseline";
#endif
constexpr RowOps kAvx2RowOps{kBaseIsa, max_avx2, scale_max_avx2, scale_add_max_avx2, scale_add_max_bf16_avx2,
                              exp_shifted_sum_avx2, exp_shifted_sum_bf16_avx2, to_bf16_avx2,
                              dot_avx2, dot_bf16_avx2, axpy_avx2, axpy_bf16_avx2, softmax_grad_avx2};

}  // namespace

const RowOps& row_ops() {
  // The passes for each setting of cpu_isa, looked up once (AVX-512 falls back to AVX2 on CPUs without it);
  // the setting itself is read per call, a load next to the pass over a row.
  static const RowOps* const passes[] = {
      avx512_row_ops(true) != nullptr ? avx512_row_ops(true) : &kAvx2RowOps,  // CpuIsa::kWidest
      &kAvx2RowOps,                                                            // CpuIsa::kAvx2
      avx512_row_ops(false) != nullptr ? avx512_row_ops(false) : &kAvx2RowOps,  // CpuIsa::kAvx512
  };
  return *passes[static_cast<int>(cpu_isa_setting())];
}

}  // namespace mha_ext::cpu
