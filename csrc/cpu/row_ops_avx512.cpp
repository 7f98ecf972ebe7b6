// The AVX-512 row passes: 16 lanes where the kernels' AVX2 code has 8, and masked loads and stores for
// the row tails. Only intrinsics and per-function target attributes are used here (no header code is
// compiled for AVX-512), so nothing AVX-512 can leak into code that runs on an AVX2-only CPU.
#include "cpu/row_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() values, which its uninitialised-use warnings
// flag in every inlined caller (GCC bug 105593); nothing here reads an undefined lane.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <limits>

#define MHA_EXT_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define MHA_EXT_AVX512_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))

namespace mha_ext::cpu {
namespace {

MHA_EXT_AVX512 inline __mmask16 tail_mask(int64_t remaining) {
  return static_cast<__mmask16>((1u << remaining) - 1u);
}

// k = round(x / ln 2) by the magic-number addition (one FMA and a subtraction instead of a multiply and a
// two-uop roundscale): exact for |x / ln 2| < 2^22, and x below ln(FLT_MIN) is masked to 0 afterwards.
MHA_EXT_AVX512 inline __m512 exp_exponent(__m512 x) {
  const __m512 magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23
  return _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504089f), magic), magic);
}

MHA_EXT_AVX512 inline __mmask16 exp_nonzero(__m512 x) {
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654475f), _CMP_NLT_UQ);
}

// exp(x) = 2^k exp(r) with |r| <= ln(2) / 2, exp(r) by Cephes' expf polynomial (about 1 ulp), 2^k by scalef
// (which overflows to inf by itself). Below ln(FLT_MIN) the result is 0, which also covers -inf (whose r is
// NaN); NaN stays NaN.
MHA_EXT_AVX512 inline __m512 exp16(__m512 x) {
  const __m512 k = exp_exponent(x);
  // r = x - k ln 2, with ln 2 split in two so that k * ln2_hi is exact.
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 exp_r = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(exp_nonzero(x), exp_r, k);
}

// exp(x) for values rounded to bf16 (8 significant bits) right after: a degree-4 minimax polynomial
// (relative error 3e-6 instead of ~1e-7) and a one-constant ln 2 (k ln 2 off by at most 3e-7), 5 vector
// instructions fewer than exp16 in the bf16 forward's costliest pass.
MHA_EXT_AVX512 inline __m512 exp16_for_bf16(__m512 x) {
  const __m512 k = exp_exponent(x);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693147182f), x);
  __m512 poly = _mm512_set1_ps(4.147836e-2f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6794982e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0004356e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(9.9996044e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(9.999992e-1f));
  return _mm512_maskz_scalef_ps(exp_nonzero(x), poly, k);
}

MHA_EXT_AVX512 float max_avx512(const float* x, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 acc = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + j));
  if (j < n) acc = _mm512_max_ps(acc, _mm512_mask_loadu_ps(neg_inf, tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(acc);
}

MHA_EXT_AVX512 float scale_max_avx512(float* x, int64_t n, float scale) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 acc = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + j), vscale);
    _mm512_storeu_ps(x + j, v);
    acc = _mm512_max_ps(acc, v);
  }
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), vscale);
    _mm512_mask_storeu_ps(x + j, mask, v);
    acc = _mm512_mask_max_ps(acc, mask, acc, v);
  }
  return _mm512_reduce_max_ps(acc);
}

// x = scale * x + addend(j), max over the row; the addends come from Load (FloatLanes or Bf16Lanes below).
template <typename Load>
MHA_EXT_AVX512 inline float scale_add_max_with(float* x, int64_t n, float scale, Load load) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 acc = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), vscale, load(j, static_cast<__mmask16>(0xffff)));
    _mm512_storeu_ps(x + j, v);
    acc = _mm512_max_ps(acc, v);
  }
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + j), vscale, load(j, mask));
    _mm512_mask_storeu_ps(x + j, mask, v);
    acc = _mm512_mask_max_ps(acc, mask, acc, v);
  }
  return _mm512_reduce_max_ps(acc);
}

// Lanes(j, mask): 16 elements of a float or bf16 row from element j, as floats (lanes outside mask 0).
struct FloatLanes {
  const float* src;
  MHA_EXT_AVX512 __m512 operator()(int64_t j, __mmask16 mask) const { return _mm512_maskz_loadu_ps(mask, src + j); }
};

struct Bf16Lanes {
  const uint16_t* src;
  // bf16 is the top half of a float: widen to 32 bits and shift into place.
  MHA_EXT_AVX512 __m512 operator()(int64_t j, __mmask16 mask) const {
    const __m512i halves = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
  }
};

MHA_EXT_AVX512 float scale_add_max_avx512(float* x, int64_t n, float scale, const float* add) {
  return scale_add_max_with(x, n, scale, FloatLanes{add});
}

MHA_EXT_AVX512 float scale_add_max_bf16_avx512(float* x, int64_t n, float scale, const uint16_t* add) {
  return scale_add_max_with(x, n, scale, Bf16Lanes{add});
}

MHA_EXT_AVX512 float exp_shifted_sum_avx512(float* x, int64_t n, float shift) {
  const __m512 vshift = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), vshift));
    _mm512_storeu_ps(x + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), vshift)));
    _mm512_mask_storeu_ps(x + j, mask, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// Round to nearest even, as c10::BFloat16 does: add 0x7fff plus the lowest kept bit, keep the top half.
struct RoundBf16 {
  MHA_EXT_AVX512 __m256i operator()(__m512 v) const {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  }
};

// The same rounding in one AVX512-BF16 instruction (which flushes denormal results to 0).
struct ConvertBf16 {
  MHA_EXT_AVX512_BF16 __m256i operator()(__m512 v) const { return (__m256i)_mm512_cvtneps_pbh(v); }
};

// The bf16 passes below carry the AVX512-BF16 target so that ConvertBf16 inlines into them; their RoundBf16
// versions contain no BF16 instruction (no compiler may turn that rounding, which keeps denormals, into
// vcvtneps2bf16) and run on every AVX-512 CPU.
template <typename ToBf16>
MHA_EXT_AVX512_BF16 inline float exp_shifted_sum_bf16_with(float* x, int64_t n, float scale, float shift,
                                                            uint16_t* out, ToBf16 to_bf16) {
  const __m512 vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16_for_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vscale, vshift));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), to_bf16(e));
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e =
        _mm512_maskz_mov_ps(mask, exp16_for_bf16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, x + j), vscale, vshift)));
    _mm256_mask_storeu_epi16(out + j, mask, to_bf16(e));
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <typename ToBf16>
MHA_EXT_AVX512_BF16 inline void to_bf16_with(const float* x, int64_t n, float scale, uint16_t* out, ToBf16 to_bf16) {
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(x + j), vscale)));
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    _mm256_mask_storeu_epi16(out + j, mask, to_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), vscale)));
  }
}

MHA_EXT_AVX512_BF16 float exp_shifted_sum_bf16_avx512(float* x, int64_t n, float scale, float shift,
                                                 uint16_t* out) {
  return exp_shifted_sum_bf16_with(x, n, scale, shift, out, RoundBf16{});
}
MHA_EXT_AVX512_BF16 float exp_shifted_sum_bf16_avx512bf16(float* x, int64_t n, float scale, float shift,
                                                 uint16_t* out) {
  return exp_shifted_sum_bf16_with(x, n, scale, shift, out, ConvertBf16{});
}
MHA_EXT_AVX512_BF16 void to_bf16_avx512(const float* x, int64_t n, float scale, uint16_t* out) {
  to_bf16_with(x, n, scale, out, RoundBf16{});
}
MHA_EXT_AVX512_BF16 void to_bf16_avx512bf16(const float* x, int64_t n, float scale, uint16_t* out) {
  to_bf16_with(x, n, scale, out, ConvertBf16{});
}

template <typename Load>
MHA_EXT_AVX512 inline float dot_with(const float* a, int64_t n, Load load) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), load(j, static_cast<__mmask16>(0xffff)), acc);
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + j), load(j, mask), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <typename Load>
MHA_EXT_AVX512 inline void axpy_with(int64_t n, float a, float* y, Load load) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(va, load(j, static_cast<__mmask16>(0xffff)), _mm512_loadu_ps(y + j)));
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    _mm512_mask_storeu_ps(y + j, mask, _mm512_fmadd_ps(va, load(j, mask), _mm512_maskz_loadu_ps(mask, y + j)));
  }
}

MHA_EXT_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) { return dot_with(a, n, FloatLanes{b}); }
MHA_EXT_AVX512 float dot_bf16_avx512(const float* a, const uint16_t* b, int64_t n) {
  return dot_with(a, n, Bf16Lanes{b});
}
MHA_EXT_AVX512 void axpy_avx512(int64_t n, float a, const float* x, float* y) { axpy_with(n, a, y, FloatLanes{x}); }
MHA_EXT_AVX512 void axpy_bf16_avx512(int64_t n, float a, const uint16_t* x, float* y) {
  axpy_with(n, a, y, Bf16Lanes{x});
}

MHA_EXT_AVX512 void softmax_grad_avx512(float* p, float* ds, int64_t n, float lse, float delta) {
  const __m512 vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 prob = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), vlse));
    _mm512_storeu_ps(p + j, prob);
    _mm512_storeu_ps(ds + j, _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(ds + j), vdelta)));
  }
  if (j < n) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 prob = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + j), vlse));
    _mm512_mask_storeu_ps(p + j, mask, prob);
    _mm512_mask_storeu_ps(ds + j, mask, _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, ds + j), vdelta)));
  }
}

constexpr RowOps kAvx512RowOps{"avx512", max_avx512, scale_max_avx512, scale_add_max_avx512,
                               scale_add_max_bf16_avx512, exp_shifted_sum_avx512, exp_shifted_sum_bf16_avx512,
                               to_bf16_avx512, dot_avx512, dot_bf16_avx512, axpy_avx512, axpy_bf16_avx512,
                               softmax_grad_avx512};
constexpr RowOps kAvx512Bf16RowOps{"avx512+bf16", max_avx512, scale_max_avx512, scale_add_max_avx512,
                                   scale_add_max_bf16_avx512, exp_shifted_sum_avx512,
                                   exp_shifted_sum_bf16_avx512bf16, to_bf16_avx512bf16, dot_avx512,
                                   dot_bf16_avx512, axpy_avx512, axpy_bf16_avx512, softmax_grad_avx512};

}  // namespace

const RowOps* avx512_row_ops(bool with_bf16_instructions) {
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!has_avx512) return nullptr;
  return with_bf16_instructions && __builtin_cpu_supports("avx512bf16") ? &kAvx512Bf16RowOps : &kAvx512RowOps;
}

}  // namespace mha_ext::cpu

#else

namespace mha_ext::cpu {
const RowOps* avx512_row_ops(bool) { return nullptr; }
}  // namespace mha_ext::cpu

#endif
