"""Builds mha_ext._C with torch.utils.cpp_extension. Install with `pip install --no-build-isolation .`
(build isolation would compile against a different torch than the one you run).

Environment: MHA_EXT_FORCE_CPU=1 builds CPU only; MHA_EXT_FORCE_CUDA=1 builds the CUDA kernels even
where no GPU is visible (needs a CUDA build of torch and CUDA_HOME); TORCH_CUDA_ARCH_LIST and MAX_JOBS
are honoured.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("mha_ext_sources", os.path.join(HERE, "mha_ext", "_sources.py"))
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)


def want_cuda() -> bool:
    if os.environ.get("MHA_EXT_FORCE_CPU") == "1":
        return False
    if os.environ.get("MHA_EXT_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(sources.cuda_sources())


def write_build_meta(with_cuda: bool, cuda_archs: str) -> None:
    """Records what this build is for, so import can refuse a mismatched torch with a clear message."""
    with open(os.path.join(HERE, "mha_ext", "_build_meta.py"), "w") as f:
        f.write("# Written by setup.py / mha_ext.jit at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {cuda_archs!r}\n")


def default_arch_list() -> str:
    if torch.cuda.is_available():
        return ""  # cpp_extension picks the local GPU
    return "8.0;9.0"


class PersistentBuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build in a fixed folder under build/ (one per Python, torch and CUDA choice): pip's
    editable installs otherwise compile in a fresh temporary folder, recompiling everything each time,
    where ninja can rebuild just what changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, use_ninja=True, **kwargs)

    def finalize_options(self):
        if self.build_temp is None:
            flavour = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
            self.build_temp = os.path.join(HERE, "build", f"temp-{flavour}")
        super().finalize_options()


with_cuda = want_cuda()
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and default_arch_list():
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "local GPU") if with_cuda else ""
write_build_meta(with_cuda, cuda_archs)

Extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
extra_compile_args = {"cxx": sources.cxx_flags()}
if with_cuda:
    extra_compile_args["cxx"].append("-DMHA_EXT_WITH_CUDA")
    extra_compile_args["nvcc"] = sources.nvcc_flags() + [f'-DMHA_EXT_CUDA_ARCHS="{cuda_archs}"']
    extra_compile_args["cxx"].append(f'-DMHA_EXT_CUDA_ARCHS="{cuda_archs}"')

setup(
    name="mha_ext",
    packages=find_packages(include=["mha_ext", "mha_ext.*"]),
    ext_modules=[
        Extension(
            "mha_ext._C",
            [os.path.relpath(s, HERE) for s in sources.python_module_sources(with_cuda)],
            include_dirs=sources.include_dirs(),
            extra_compile_args=extra_compile_args,
            extra_link_args=sources.link_flags(),
        )
    ],
    cmdclass={"build_ext": PersistentBuildExtension},
)
