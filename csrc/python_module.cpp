// The Python extension module mha_ext._C: importing it registers the ops; build_info() says what was built.
#include <torch/extension.h>
#include <torch/version.h>

#include "cpu/gemm.h"

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#if defined(__AVX2__) && defined(__FMA__)
  info["cpu_isa"] = "avx2+fma";
#else
  info["cpu_isa"] = "baseline";
#endif
  info["cpu_gemm"] = mha_ext::cpu::gemm_engine();
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
}
