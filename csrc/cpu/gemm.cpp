#include "cpu/gemm.h"
#include "attention/settings.h"
#include "cpu/row_ops.h"
#include "cpu/vec_dot.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

// Fortran BLAS entry points exported by the BLAS torch links (LP64 integers). Weak, so that a torch
// build without them still loads this library and falls back to the native products.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace mha_ext::cpu {
namespace {

bool use_blas() {
  return kernel_settings().cpu_gemm == CpuGemm::kBlas && sgemm_ != nullptr && dgemm_ != nullptr;
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <typename T>
void scale_rows(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      std::memset(c, 0, sizeof(T) * N);  // beta == 0 must not propagate NaN/inf from C
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
}

// c[0:n] += a * b[0:n] and sum(a[0:n] * b[0:n]): float ones in the row passes' ISA (AVX-512 where present).
inline void axpy(const RowOps& ops, int64_t n, float a, const float* b, float* c) { ops.axpy(n, a, b, c); }
inline void axpy(const RowOps&, int64_t n, double a, const double* b, double* c) { vec_axpy(n, a, b, c); }
inline float dot(const RowOps& ops, int64_t n, const float* a, const float* b) { return ops.dot(a, b, n); }
inline double dot(const RowOps&, int64_t n, const double* a, const double* b) { return vec_dot(n, a, b); }

template <typename T>
void native_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                 const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  scale_rows(M, N, beta, C, ldc);
  const RowOps& ops = row_ops();  // once, out of the loops
  if (ta == Trans::kNo && tb == Trans::kYes) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] += alpha * dot(ops, K, A + i * lda, B + j * ldb);
  } else if (ta == Trans::kNo && tb == Trans::kNo) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) axpy(ops, N, alpha * A[i * lda + k], B + k * ldb, C + i * ldc);
  } else if (ta == Trans::kYes && tb == Trans::kNo) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < M; ++i) axpy(ops, N, alpha * A[k * lda + i], B + k * ldb, C + i * ldc);
  } else {
    TORCH_CHECK(false, "mha_ext internal error: gemm(T, T) is not implemented");
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
template <typename T, typename Blas>
bool try_blas(Blas* blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
              int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (!use_blas() || M < kBlasMinRows || !fits_int(M) || !fits_int(N) || !fits_int(K) || !fits_int(lda) || !fits_int(ldb) ||
      !fits_int(ldc)) {
    return false;
  }
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    scale_rows(M, N, beta, C, ldc);
    return true;
  }
  const char flag_a = ta == Trans::kYes ? 'T' : 'N';
  const char flag_b = tb == Trans::kYes ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  // BLAS insists on leading dims >= the stored row length even when there is a single row.
  const int ld_a = static_cast<int>(std::max<int64_t>(lda, ta == Trans::kYes ? M : K));
  const int ld_b = static_cast<int>(std::max<int64_t>(ldb, tb == Trans::kYes ? K : N));
  const int ld_c = static_cast<int>(std::max<int64_t>(ldc, N));
  blas(&flag_b, &flag_a, &n, &m, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
  return true;
}

// brgemm is a micro-kernel without cache blocking: with both K and N large (head dims of 512) it streams its
// B panel from L2 for every row block, where MKL's blocked SGEMM does not; below that brgemm is faster.
constexpr int64_t kBrgemmMaxInnerAndColumns = 256;

// Untransposed float products go to torch's batch-reduce GEMM (oneDNN's brgemm micro-kernels), which runs
// AVX-512 code where the CPU has it: 115 GFLOP/s per core on this project's AMD EPYC for 64 x 512 x 64
// tiles, against 95 for MKL's SGEMM, which picks its AVX2 kernels on AMD CPUs. brgemm has no alpha and
// takes beta as "add to C", so only alpha = 1, beta in {0, 1} qualify. It holds no AMX state for float
// inputs, so no brgemm_release() is needed afterwards.
bool try_brgemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (!use_blas() || ta != Trans::kNo || tb != Trans::kNo || alpha != 1.f || (beta != 0.f && beta != 1.f) ||
      M < kBlasMinRows || K == 0 || std::min(K, N) > kBrgemmMaxInnerAndColumns) {
    return false;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/beta == 1.f, A, B, C, /*is_vnni=*/false);
  return true;
}

}  // namespace

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (!try_brgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) &&
      !try_blas(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
    native_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (!try_blas(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
    native_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                    int64_t ldb, bool add_to_c, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_to_c, A, B, C, /*is_vnni=*/true);
}

namespace {

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// A 3 x 5 x 4 product through the VNNI path against the same product done by hand.
bool bf16_vnni_self_test() {
  constexpr int64_t M = 3, N = 5, K = 4;
  c10::BFloat16 a[M * K], b_vnni[K * N];
  float expected[M * N] = {}, c[M * N] = {};
  for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7) - 3.f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) b_vnni[(k / 2) * N * 2 + j * 2 + k % 2] = static_cast<float>((k * N + j) % 5) - 2.f;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k)
        expected[i * N + j] += static_cast<float>(a[i * K + k]) * static_cast<float>(b_vnni[(k / 2) * N * 2 + j * 2 + k % 2]);
  try {
    gemm_bf16_vnni(M, N, K, a, K, b_vnni, N, /*add_to_c=*/false, c, N);
    release_tile_state();
  } catch (const c10::Error&) {
    return false;
  }
  return std::equal(c, c + M * N, expected);
}

}  // namespace

const char* bf16_vnni_unavailable() {
  if (!use_blas()) return "cpu_gemm is 'native': the built-in products widen bfloat16 to float32";
  if (!at::globalContext().userEnabledMkldnn()) return "oneDNN is off (torch.backends.mkldnn.enabled is False)";
  // AMX (could_pack) or AVX512-BF16: oneDNN's bf16 micro-kernels then beat widening tiles to fp32; on older
  // AVX-512 CPUs oneDNN would emulate bf16 dot products.
  static const bool has_isa = at::native::cpublas::could_pack(at::kBFloat16) || cpu_has_avx512_bf16();
  if (!has_isa) return "this CPU has neither AMX nor AVX512-BF16, which oneDNN's bfloat16 products need";
  static const bool passed = bf16_vnni_self_test();
  return passed ? nullptr : "oneDNN's bfloat16 product failed its self-test on this CPU";
}

bool bf16_vnni_available() { return bf16_vnni_unavailable() == nullptr; }

void release_tile_state() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

const char* gemm_engine() { return use_blas() ? "blas" : "native"; }

const char* gemm_engine_description() {
  return use_blas() ? "oneDNN's brgemm and the BLAS torch links" : "the built-in vectorised GEMM";
}

}  // namespace mha_ext::cpu
