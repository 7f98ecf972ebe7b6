"""Just-in-time build of the kernels with torch.utils.cpp_extension.load, for development: edit a
kernel under csrc/ and re-run, without reinstalling. `MHA_EXT_JIT=1 python ...` makes `import mha_ext`
use it. The build is cached (by source hash) under torch's extension directory
(TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import os

import torch
from torch.utils import cpp_extension

from . import _sources

_module = None


def _with_cuda() -> bool:
    if os.environ.get("MHA_EXT_FORCE_CPU") == "1":
        return False
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None and bool(_sources.cuda_sources())


def load(verbose: bool = False):
    """Compiles (if needed) and imports the kernels; returns the extension module."""
    global _module
    if _module is None:
        with_cuda = _with_cuda()
        cxx = _sources.cxx_flags() + (["-DMHA_EXT_WITH_CUDA", '-DMHA_EXT_CUDA_ARCHS="local GPU"'] if with_cuda else [])
        _module = cpp_extension.load(
            name="mha_ext_jit",
            sources=_sources.python_module_sources(with_cuda),
            extra_cflags=cxx,
            extra_cuda_cflags=_sources.nvcc_flags() + ['-DMHA_EXT_CUDA_ARCHS="local GPU"'],
            extra_ldflags=_sources.link_flags(),
            extra_include_paths=_sources.include_dirs(),
            with_cuda=with_cuda,
            verbose=verbose,
        )
    return _module
