"""The backends a kernel test runs on: the CUDA kernels run on the CPU by the emulator (always), and on a GPU
(where there is one). Their results are compared with the CPU kernels' and the fp64 reference."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import pytest

from .reference import cuda_ready


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str          # where the test's tensors live
    emulated: bool       # the CUDA kernels run on the CPU by tests/cuda_emulator

    @contextlib.contextmanager
    def active(self):
        """Within it, the ops run on this backend's kernels."""
        if not self.emulated:
            yield
            return
        from .emulator import emulated_cuda_kernels

        with emulated_cuda_kernels():
            yield


EMULATED_CUDA = Backend("emulated_cuda", "cpu", emulated=True)
CUDA = Backend("cuda", "cuda", emulated=False)

EMULATOR_MARKS = [
    pytest.mark.emulator,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator's fibers use Linux's ucontext"),
    # Putting the emulated kernels behind the CPU key overrides the CPU kernels, which torch warns about.
    pytest.mark.filterwarnings("ignore:Warning only once for all operators:UserWarning"),
]
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or no CUDA build of mha_ext")]


def param(backend: Backend, *values):
    """A pytest.param of (backend, *values) with the backend's marks and id."""
    marks = EMULATOR_MARKS if backend.emulated else GPU_MARKS
    return pytest.param(backend, *values, marks=marks, id="-".join([backend.name, *map(str, values)]))


CUDA_BACKENDS = [param(EMULATED_CUDA), param(CUDA)]
