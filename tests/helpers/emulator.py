"""The CUDA kernels of csrc/cuda run on the CPU by the emulator in tests/cuda_emulator (docs/cuda.md,
"Testing without a GPU"): compiled once per checkout as host code by g++ (no nvcc, no CUDA torch), and put
behind the CPU dispatch key of the mha_ext ops inside `with emulated_cuda_kernels():`, so that the whole
Python layer (autograd included) runs on them and can be compared with the CPU kernels and the fp64
reference on the same CPU tensors."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

from torch.utils import cpp_extension

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(TESTS, "cuda_emulator")


def _checkout_sources():
    """This checkout's mha_ext/_sources.py (the source lists), whichever mha_ext is installed: the emulator
    compiles the kernels of the tree these tests belong to."""
    spec = importlib.util.spec_from_file_location(
        "mha_ext_checkout_sources", os.path.join(os.path.dirname(TESTS), "mha_ext", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sources = _checkout_sources()
BUILD = os.path.join(_sources.ROOT, "build", "cuda-emulator")


def _kernel_wrappers() -> list[str]:
    """One .cpp per csrc/cuda .cu file that includes it, since g++ compiles .cpp (rewritten only on change,
    so that ninja rebuilds only what changed)."""
    wrappers = []
    for cu in _sources.cuda_sources():
        if not cu.endswith(".cu"):
            continue
        path = os.path.join(BUILD, os.path.relpath(cu, _sources.CSRC).replace(os.sep, "_")[:-3] + ".cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(path)
    return wrappers


@functools.cache
def load():
    import mha_ext

    os.makedirs(BUILD, exist_ok=True)
    sources = [os.path.join(_sources.CSRC, "cuda", "dispatch.cpp")]
    sources += [os.path.join(EMULATOR, name) for name in ("emulator.cpp", "ptx.cpp", "module.cpp")] + _kernel_wrappers()
    # The ops' bodies (contract, entry, settings) come from the loaded mha_ext._C, which this module links
    # against: one copy of them, and of the kernel settings, in the process.
    library = mha_ext._C.__file__
    # The emulator's headers come first, so that its cuda/launch_kernel.cuh replaces csrc's.
    return cpp_extension.load(
        name="mha_ext_cuda_emulator", sources=sources, build_directory=BUILD,
        extra_include_paths=[os.path.join(EMULATOR, "include"), _sources.CSRC],
        extra_cflags=["-O2", "-fno-math-errno", "-DMHA_EXT_CUDA_EMULATOR", "-include", "cuda_runtime.h"]
        + (["-mf16c"] if _sources.is_x86_64() else []),  # c10::Half converts with F16C instructions
        extra_ldflags=[library, f"-Wl,-rpath,{os.path.dirname(library)}"],
        verbose=bool(os.environ.get("MHA_EXT_EMULATOR_VERBOSE")))


@contextlib.contextmanager
def emulated_cuda_kernels():
    """Inside, the mha_ext ops on CPU tensors run the emulated CUDA kernels instead of the CPU kernels."""
    module = load()
    override = module.CpuOverride()
    try:
        yield module
    finally:
        override.close()
