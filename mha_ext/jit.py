"""Just-in-time build of the kernels with torch.utils.cpp_extension.load, for development in a source
checkout: edit a kernel under csrc/ and re-run, without reinstalling. `MHA_EXT_JIT=1 python ...` makes
`import mha_ext` use it (set it before Python starts: the ops can be registered once per process). The
build is cached under torch's extension directory (TORCH_EXTENSIONS_DIR); ninja recompiles what changed."""

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
    """Compiles (if needed) and imports the kernels of this source checkout; returns the extension module.

    ``MHA_EXT_JIT=1`` makes ``import mha_ext`` call this instead of importing the installed build. torch
    registers the mha_ext ops once per process, so once ``import mha_ext`` has loaded the installed build,
    this raises a RuntimeError saying to set the variable before Python starts; it needs the sources
    (csrc/ next to the package: a checkout or an editable install), and raises an ImportError without them.
    """
    global _module
    if _module is not None:
        return _module
    from . import _loader

    if _loader.loaded() is not None:
        raise RuntimeError(
            "mha_ext.jit.load(): this process has already loaded mha_ext's installed build (importing mha_ext "
            "loads it), and torch registers the mha_ext ops only once per process. Set MHA_EXT_JIT=1 before "
            "Python starts (`MHA_EXT_JIT=1 python your_script.py`): `import mha_ext` then compiles and loads "
            "the sources instead.")
    if not _sources.have_sources():
        raise ImportError(
            f"MHA_EXT_JIT=1 compiles mha_ext's C++/CUDA sources, which this installation does not include "
            f"({_sources.CSRC} does not exist); unset MHA_EXT_JIT, or install from a source checkout in editable "
            "mode: `pip install --no-build-isolation -e .`")
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
