#include "attention/settings.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mha_ext {
namespace {

bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

// Kernels read the settings in their inner loops (the CPU's row passes): each is one relaxed load of a
// constant-initialised atomic, which holds kFromEnvironment until its first read.
constexpr int kFromEnvironment = -1;

struct Setting {
  std::atomic<int> value;
  int (*from_environment)();

  int read() {
    int current = value.load(std::memory_order_relaxed);
    if (current != kFromEnvironment) return current;
    const int default_value = from_environment();
    return value.compare_exchange_strong(current, default_value, std::memory_order_relaxed) ? default_value : current;
  }
};

Setting g_cpu_gemm{{kFromEnvironment}, [] {
  return static_cast<int>(env_is("MHA_EXT_CPU_GEMM", "native") ? CpuGemm::kNative : CpuGemm::kBlas);
}};
Setting g_cpu_isa{{kFromEnvironment}, [] {
  return static_cast<int>(env_is("MHA_EXT_CPU_ISA", "avx2")     ? CpuIsa::kAvx2
                          : env_is("MHA_EXT_CPU_ISA", "avx512") ? CpuIsa::kAvx512
                                                                : CpuIsa::kWidest);
}};
Setting g_cuda_tensor_cores{{kFromEnvironment}, [] { return env_is("MHA_EXT_CUDA_TENSOR_CORES", "0") ? 0 : 1; }};

const char* const kGemmNames[] = {"blas", "native"};
const char* const kIsaNames[] = {"auto", "avx2", "avx512"};

// The index of `value` among `names`, or a ValueError naming the setting.
template <size_t N>
int index_of(const char* const (&names)[N], const std::string& setting, const std::string& value) {
  for (size_t i = 0; i < N; ++i)
    if (value == names[i]) return static_cast<int>(i);
  std::string expected;
  for (size_t i = 0; i < N; ++i) expected += std::string(i ? ", " : "") + "\"" + names[i] + "\"";
  TORCH_CHECK_VALUE(false, "mha_ext: setting ", setting, " must be one of ", expected, ", got \"", value, "\"");
  return -1;
}

}  // namespace

KernelSettings kernel_settings() {
  return {static_cast<CpuGemm>(g_cpu_gemm.read()), cpu_isa_setting(), g_cuda_tensor_cores.read() == 1};
}

CpuIsa cpu_isa_setting() { return static_cast<CpuIsa>(g_cpu_isa.read()); }

std::vector<std::pair<std::string, std::string>> kernel_settings_text() {
  const KernelSettings s = kernel_settings();
  return {{"cpu_gemm", kGemmNames[static_cast<int>(s.cpu_gemm)]},
          {"cpu_isa", kIsaNames[static_cast<int>(s.cpu_isa)]},
          {"cuda_tensor_cores", s.cuda_tensor_cores ? "on" : "off"}};
}

void set_kernel_setting(const std::string& name, const std::string& value) {
  static const char* const kSwitchNames[] = {"off", "on"};
  if (name == "cpu_gemm") {
    g_cpu_gemm.value.store(index_of(kGemmNames, name, value));
  } else if (name == "cpu_isa") {
    g_cpu_isa.value.store(index_of(kIsaNames, name, value));
  } else if (name == "cuda_tensor_cores") {
    g_cuda_tensor_cores.value.store(index_of(kSwitchNames, name, value));
  } else {
    TORCH_CHECK_VALUE(false, "mha_ext: no setting named \"", name, "\"; the settings are cpu_gemm, cpu_isa and ",
                      "cuda_tensor_cores");
  }
}

}  // namespace mha_ext
