// The Python extension module mha_ext._C: importing it registers the ops; build_info() says what was built,
// kernel_settings() / set_kernel_setting() read and change the run-time kernel choices (attention/settings.h).
// Plain pybind11, without torch/extension.h: the module binds no tensors, and that header alone costs
// most of a minute of compile time.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "attention/settings.h"
#include "cpu/gemm.h"
#include "cpu/row_ops.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#if defined(__AVX2__) && defined(__FMA__)
  // The kernels' own ISA, and the one their softmax row passes picked at run time (avx2 or avx512).
  info["cpu_isa"] = std::string("avx2+fma, row passes ") + mha_ext::cpu::row_ops().isa;
#else
  info["cpu_isa"] = std::string("baseline, row passes ") + mha_ext::cpu::row_ops().isa;
#endif
  info["cpu_gemm"] = mha_ext::cpu::gemm_engine();
  // "vnni": bf16 tiles multiplied as bf16 (AMX / AVX512-BF16, oneDNN); "float": widened to float32.
  info["cpu_bf16_products"] = mha_ext::cpu::bf16_vnni_available() ? "vnni" : "float";
#if defined(MHA_EXT_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = MHA_EXT_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mha_ext kernels; the ops live under torch.ops.mha_ext";
  m.def("build_info", &build_info, "What this build of mha_ext was compiled with");
  m.def("kernel_settings", [] {
    py::dict settings;
    for (const auto& [name, value] : mha_ext::kernel_settings_text()) settings[py::str(name)] = value;
    return settings;
  }, "The run-time kernel settings, as text");
  m.def("set_kernel_setting", &mha_ext::set_kernel_setting, "Sets one kernel setting from its text");
}
