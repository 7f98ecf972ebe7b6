// The sm80 warp-level instructions the FlashAttention-2-class kernels are built from, one function each:
// mma.sync m16n8k16 (16-bit operands, fp32 accumulators), ldmatrix.x4 (optionally transposed; the
// emulator's ldmatrix also takes x1 and x2), cp.async (16 bytes, zero-filled where the source is out of
// bounds) with its commit and wait groups, and ex2.approx, the exponential of the softmax.
// Fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16"), with groupID = lane / 4 and
// threadID_in_group = lane % 4:
//   A (16 x 16, row-major), a[0..3] of 2 elements each: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
//   B (16 x 8, "col"),      b[0..1]:                    (k = 2t..2t+1, n = g), (k = 2t+8.., n = g)
//   C/D (16 x 8, fp32),     c[0..3]:                    (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// ldmatrix: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8 x 8 matrix i; register i of lane l
// gets row l / 4, elements 2(l % 4) and 2(l % 4) + 1 of matrix i (transposed: column l / 4, rows 2(l % 4)
// and 2(l % 4) + 1). Where the tests compile the kernels as host code (MHA_EXT_CUDA_EMULATOR), the same
// functions are the emulator's (tests/cuda_emulator/ptx.cpp), which checks each one's rules.
#pragma once

#include <cmath>
#include <cstdint>

namespace mha_ext::cuda::ptx {

#ifdef MHA_EXT_CUDA_EMULATOR

// d = a b + c, for the lanes of a warp together; `bf16` picks the operand type.
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16);
// `count` (1, 2 or 4) 8 x 8 matrices of 16-bit elements, from the row addresses of lanes 0 .. 8 count - 1.
void ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row);
// 16 bytes from `gmem` to `smem`, or 16 zero bytes where `in_bounds` is false (gmem is then not read).
void cp_async_16(void* smem, const void* gmem, bool in_bounds);
void cp_async_commit();
// Waits until at most `pending` of this thread's committed groups are in flight.
void cp_async_wait(int pending);

template <bool kBf16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16(d, a, b, d, kBf16);
}
__device__ __forceinline__ float ex2(float x) { return std::exp2(x); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix(r, 4, false, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix(r, 4, true, row); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  cp_async_wait(kPending);
}

#else

// 2^x by the MUFU unit (ex2.approx.ftz: relative error 2^-22, subnormal results flushed to 0; what exp2f
// compiles to under --use_fast_math, which FlashAttention-2 is built with).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a b.
template <bool kBf16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// cp.async.cg (cached in L2 only: each tile is read once per block) with src-size 0 where out of bounds,
// which writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(in_bounds ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

#endif

}  // namespace mha_ext::cuda::ptx
