// Small row-major matrix products for attention tiles.
//
// Untransposed float products run on torch's batch-reduce GEMM (oneDNN brgemm), the others on the BLAS
// torch links (MKL on x86 wheels), found at run time; where no BLAS symbol is present (or
// MHA_EXT_CPU_GEMM=native), a vectorised fallback computes the same products.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace mha_ext::cpu {

enum class Trans { kNo, kYes };

// Below this many rows (decode: one query row) BLAS's packing costs more than the product itself; gemm()
// then streams the operands once with vectorised dot products and row updates instead.
constexpr int64_t kBlasMinRows = 4;

// C (M x N) = alpha * op(A) * op(B) + beta * C, all row-major with leading dims lda/ldb/ldc.
// op(A) is M x K, op(B) is K x N. Supported: (kNo, kNo), (kNo, kYes), (kYes, kNo).
void gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
          int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// bfloat16 tile products on oneDNN's brgemm (AMX tiles where the CPU has them): C (M x N, float) (+)= A B
// with A (M x K) row-major bf16 and B in VNNI layout, (K / 2) rows of N bf16 pairs (B[2i][j], B[2i+1][j]),
// ld_b pairs apart; K even. Only where bf16_vnni_available() says so.
void gemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                    int64_t ldb, bool add_to_c, float* C, int64_t ldc);

// Whether gemm_bf16_vnni runs in this process now: torch's GEMMs in use (setting cpu_gemm "blas"), oneDNN
// enabled (torch.backends.mkldnn, checked per call), the CPU has AMX or AVX512-BF16, and a self-test product on
// first use gave the right numbers (where the CPU lacks AMX, torch's fallback would misread the VNNI layout).
bool bf16_vnni_available();
// Why not, in words; nullptr where it is available.
const char* bf16_vnni_unavailable();

// Gives back the AMX tile state a thread's gemm_bf16_vnni calls configured; call at the end of a parallel
// region's work.
void release_tile_state();

// "blas" (brgemm + BLAS, as above) or "native": which engines gemm() uses now (setting cpu_gemm, and whether
// the BLAS torch links is there).
const char* gemm_engine();
// The same, in words (mha_ext.explain).
const char* gemm_engine_description();

}  // namespace mha_ext::cpu
