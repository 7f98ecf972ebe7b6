// Run-time choices between kernels that compute the same thing, to compare them (tests, the benchmark).
// The environment gives the defaults, read once: MHA_EXT_CPU_GEMM=native, MHA_EXT_CPU_ISA=avx2|avx512,
// MHA_EXT_CUDA_TENSOR_CORES=0; mha_ext.settings(...) changes them for a scope. Kernels read them per call:
// change them between calls, not while ops run in other threads.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace mha_ext {

enum class CpuGemm { kBlas, kNative };  // brgemm + BLAS, or the built-in vectorised products
enum class CpuIsa { kWidest, kAvx2, kAvx512 };  // kAvx512: without AVX512-BF16's rounding instruction

struct KernelSettings {
  CpuGemm cpu_gemm = CpuGemm::kBlas;
  CpuIsa cpu_isa = CpuIsa::kWidest;
  bool cuda_tensor_cores = true;
};

KernelSettings kernel_settings();
// The CPU's vector ISA setting alone: what the row passes read in their inner loops.
CpuIsa cpu_isa_setting();

// The settings as text: cpu_gemm "blas" | "native", cpu_isa "auto" | "avx2" | "avx512", cuda_tensor_cores
// "on" | "off".
std::vector<std::pair<std::string, std::string>> kernel_settings_text();

// Sets one of them from its text; a ValueError naming the setting and the values it takes otherwise.
void set_kernel_setting(const std::string& name, const std::string& value);

}  // namespace mha_ext
