// Dot products and row updates in at::vec (the kernels' compile-time ISA): the native GEMM's double
// products and the AVX2 row passes' float ones.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mha_ext::cpu {

// sum(a[0:n] * b[0:n])
template <typename T>
inline T vec_dot(int64_t n, const T* a, const T* b) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc);
  T sum = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// c[0:n] += a * b[0:n]
template <typename T>
inline void vec_axpy(int64_t n, T a, const T* b, T* c) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) at::vec::fmadd(va, Vec::loadu(b + j), Vec::loadu(c + j)).store(c + j);
  for (; j < n; ++j) c[j] += a * b[j];
}

}  // namespace mha_ext::cpu
