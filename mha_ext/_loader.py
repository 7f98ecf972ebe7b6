"""Loads the compiled kernels (mha_ext._C, or a JIT build with MHA_EXT_JIT=1), refusing with a clear
message where they cannot run: a CPU without AVX2/FMA/F16C, or a build made for another torch version."""

from __future__ import annotations

import importlib
import os

import torch

from . import _sources


def cpu_flags() -> set[str]:
    """The CPU's own feature flags from /proc/cpuinfo; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_avx2_fma() -> bool:
    """Reads the CPU's own flags (not torch's ATEN_CPU_CAPABILITY, which a user may lower on purpose)."""
    flags = cpu_flags()
    if flags:
        return {"avx2", "fma", "f16c"} <= flags
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def check_cpu() -> None:
    if _sources.is_x86_64() and not cpu_supports_avx2_fma():
        raise ImportError(
            "mha_ext: this CPU lacks AVX2/FMA/F16C, which mha_ext's CPU kernels are compiled for; "
            "use torch.nn.functional.scaled_dot_product_attention on this machine"
        )


def check_torch_version(built_for: str) -> None:
    if _base_version(built_for) != _base_version(torch.__version__):
        jit = " (or set MHA_EXT_JIT=1 to compile this checkout's sources on import)" if _sources.have_sources() else ""
        raise ImportError(
            f"mha_ext was built against torch {built_for} but torch {torch.__version__} is running; "
            f"rebuild it with `pip install --no-build-isolation .`{jit}"
        )


_module = None


def loaded():
    """The extension module this process has loaded, or None before the first load()."""
    return _module


def build_info() -> dict:
    """What this build was compiled with: torch version, CPU ISA, CPU GEMM engine, CUDA and its archs."""
    return dict(load().build_info())


def load():
    """Returns the extension module, importing it on the first call; importing it registers
    torch.ops.mha_ext.*."""
    global _module
    if _module is None:
        _module = _import_module()
    return _module


def _import_module():
    check_cpu()
    if os.environ.get("MHA_EXT_JIT") == "1":
        from . import jit

        return jit.load()
    try:
        meta = importlib.import_module("mha_ext._build_meta")
    except ImportError:
        meta = None
    if meta is not None:
        check_torch_version(meta.TORCH_VERSION)
    try:
        return importlib.import_module("mha_ext._C")
    except ImportError as error:
        jit = ", or set MHA_EXT_JIT=1 to compile them on import" if _sources.have_sources() else ""
        raise ImportError(
            f"mha_ext's compiled kernels could not be imported ({error}); build them with "
            f"`pip install --no-build-isolation .`{jit}"
        ) from error
