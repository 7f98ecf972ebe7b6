// WMMA (nvcuda::wmma) for kernels compiled by the emulator. Every lane of a warp holds the whole 16 x 16
// tile of a fragment (the hardware spreads it over the lanes in an unspecified layout, so kernels may only
// apply the same operation to every element, which this preserves). Each call is a warp barrier, which
// checks that the whole warp makes it together, and checks what the hardware requires of its arguments:
// the same on every lane, 256-bit aligned pointers, and ldm a multiple of 16 bytes.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  // matrix_a is M x K, matrix_b K x N, the accumulator M x N; elements are kept row by row.
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace detail {

// The warp barrier of a load or store, which also checks that every lane passes lane 0's pointer and ldm
// (WMMA's arguments are warp-uniform).
template <typename T>
void check_operand(const char* call, const T* ptr, unsigned ldm) {
  const uint64_t mine = reinterpret_cast<uintptr_t>(ptr) ^ (uint64_t(ldm) << 48);
  if (::mha_emu::warp_barrier(call, 0xffffffffu, mine, 0) != mine)
    ::mha_emu::fail((std::string(call) + ": the lanes of a warp pass different pointers or ldm").c_str());
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    ::mha_emu::fail((std::string(call) + ": the pointer is not 256-bit aligned").c_str());
  if (ldm * sizeof(T) % 16 != 0)
    ::mha_emu::fail((std::string(call) + ": ldm is not a multiple of 16 bytes").c_str());
}

template <typename Fragment, typename T>
void load(Fragment& f, const T* ptr, unsigned ldm, bool row_major_memory) {
  for (int r = 0; r < Fragment::rows; ++r)
    for (int c = 0; c < Fragment::cols; ++c)
      f.x[r * Fragment::cols + c] = row_major_memory ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::check_operand("wmma::load_matrix_sync", ptr, ldm);
  detail::load(f, ptr, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm, layout_t layout) {
  detail::check_operand("wmma::load_matrix_sync", ptr, ldm);
  detail::load(f, ptr, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  detail::check_operand("wmma::store_matrix_sync", ptr, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& x : f.x) x = value;
}

namespace detail {

// A warp's operands and result of its last mma_sync. Lanes run in order after a warp barrier, so lane 0
// computes the product and lanes 1-31 take it, once they have checked that their operands are the same
// (a warp's lanes share one product; different operands mean the warp did not load the same tiles).
struct MmaOfWarp {
  float a[256], b[256], c[256], d[256];
};
inline MmaOfWarp mma_of_warp[32];

template <int kElements, typename T>
void widen(float* out, const T* in) {
  for (int i = 0; i < kElements; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace detail

// d = a b + c, products and sums in fp32 (d may be c).
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  static_assert(M * K <= 256 && K * N <= 256 && M * N <= 256);
  ::mha_emu::warp_barrier("wmma::mma_sync", 0xffffffffu, 0, 0);
  detail::MmaOfWarp& shared = detail::mma_of_warp[threadIdx.x / 32 % 32];
  float a_wide[M * K], b_wide[K * N];
  detail::widen<M * K>(a_wide, a.x);
  detail::widen<K * N>(b_wide, b.x);
  if (threadIdx.x % 32 != 0) {
    if (std::memcmp(a_wide, shared.a, sizeof(a_wide)) != 0 || std::memcmp(b_wide, shared.b, sizeof(b_wide)) != 0 ||
        std::memcmp(c.x, shared.c, sizeof(c.x)) != 0)
      ::mha_emu::fail("wmma::mma_sync: the lanes of a warp hold different operands");
    std::memcpy(d.x, shared.d, sizeof(d.x));
    return;
  }
  std::memcpy(shared.a, a_wide, sizeof(a_wide));
  std::memcpy(shared.b, b_wide, sizeof(b_wide));
  std::memcpy(shared.c, c.x, sizeof(c.x));
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += a_wide[m * K + k] * b_wide[k * N + n];
      shared.d[m * N + n] = sum;
    }
  std::memcpy(d.x, shared.d, sizeof(d.x));
}

}  // namespace nvcuda::wmma
