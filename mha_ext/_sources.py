"""Where the C++/CUDA sources are and how to compile them: the one list that setup.py, the JIT loader
(mha_ext.jit) and the CMake build (through `python -m mha_ext._sources --cmake`) all use.

Pure Python with no torch import, so setup.py can read it before anything is built.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Sources of the op library itself (schemas, contract, CPU kernels): what CMake builds too.
LIBRARY_PATTERNS = ("ops.cpp", "attention/*.cpp", "cpu/*.cpp")
# The pybind11 module that turns the library into mha_ext._C.
PYTHON_MODULE = "python_module.cpp"
CUDA_PATTERNS = ("cuda/*.cu", "cuda/**/*.cu", "cuda/*.cpp")


def _glob(patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(CSRC, pattern), recursive=True)
    return sorted(set(found))


def have_sources() -> bool:
    """Whether the C++/CUDA sources are here: a source checkout or an editable install, not a wheel."""
    return os.path.isfile(os.path.join(CSRC, PYTHON_MODULE))


def library_sources() -> list[str]:
    return _glob(LIBRARY_PATTERNS)


def cuda_sources() -> list[str]:
    return _glob(CUDA_PATTERNS)


def python_module_sources(with_cuda: bool) -> list[str]:
    return library_sources() + [os.path.join(CSRC, PYTHON_MODULE)] + (cuda_sources() if with_cuda else [])


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cxx_flags() -> list[str]:
    """-O3 without debug info, OpenMP for at::parallel_for, and AVX2/FMA/F16C vector code on x86-64 (checked at import)."""
    # -g0: Python's own CFLAGS ask for debug info (-g), which slows every compile and nobody reads here.
    flags = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if is_x86_64():
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def link_flags() -> list[str]:
    # libgomp resolves to the copy torch already loaded (same soname), so there is one OpenMP runtime.
    return ["-fopenmp"]


def nvcc_flags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DMHA_EXT_WITH_CUDA"]


def include_dirs() -> list[str]:
    return [CSRC]


if __name__ == "__main__" and sys.argv[1:] == ["--cmake"]:
    # Comma-separated lists for CMakeLists.txt: sources on the first line, C++ flags on the second.
    print(",".join(library_sources()))
    print(",".join(cxx_flags()))
