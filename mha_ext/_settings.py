"""Run-time choices between kernels that compute the same thing, to compare them: the CPU's tile products
(``cpu_gemm``), its vector ISA (``cpu_isa``) and the CUDA tensor cores (``cuda_tensor_cores``).

The environment gives the defaults (``MHA_EXT_CPU_GEMM=native``, ``MHA_EXT_CPU_ISA=avx2|avx512``,
``MHA_EXT_CUDA_TENSOR_CORES=0``); ``with mha_ext.settings(...)`` changes them for a scope, in this process.
The kernels read them per call: change them between calls, not while ops run in other threads.
"""

from __future__ import annotations

import contextlib

from ._loader import load
from .errors import AttentionTypeError, AttentionValueError

# Each setting's values, as the kernels name them (attention/settings.h).
_CHOICES = {
    "cpu_gemm": ("blas", "native"),           # brgemm + the BLAS torch links, or the built-in vectorised products
    "cpu_isa": ("auto", "avx2", "avx512"),    # the widest the CPU has, AVX2, or AVX-512 without AVX512-BF16
    "cuda_tensor_cores": (True, False),       # fp16/bf16 on tensor cores where they can run, or on CUDA cores
}


def current_settings() -> dict:
    """The kernel settings now: {"cpu_gemm": "blas" | "native", "cpu_isa": "auto" | "avx2" | "avx512",
    "cuda_tensor_cores": bool}."""
    text = dict(load().kernel_settings())
    return {"cpu_gemm": text["cpu_gemm"], "cpu_isa": text["cpu_isa"],
            "cuda_tensor_cores": text["cuda_tensor_cores"] == "on"}


def _set(name: str, value) -> None:
    if name not in _CHOICES:
        raise AttentionTypeError(f"mha_ext.settings: no setting named {name!r}; the settings are {', '.join(_CHOICES)}")
    if value not in _CHOICES[name] or isinstance(value, bool) != isinstance(_CHOICES[name][0], bool):
        raise AttentionValueError(f"mha_ext.settings: {name} must be one of {_CHOICES[name]}, got {value!r}")
    load().set_kernel_setting(name, ("on" if value else "off") if isinstance(value, bool) else value)


@contextlib.contextmanager
def settings(**overrides):
    """Within the ``with`` block, run the kernels with these settings; the previous ones come back after it.

    ``cpu_gemm``: ``"blas"`` (oneDNN's brgemm and the BLAS torch links) or ``"native"`` (the built-in
    vectorised products). ``cpu_isa``: ``"auto"`` (AVX-512 row passes where the CPU has them), ``"avx2"`` or
    ``"avx512"`` (without AVX512-BF16's rounding instruction). ``cuda_tensor_cores``: ``False`` keeps
    float16/bfloat16 on the CUDA-core kernels. ``mha_ext.explain`` says what a call then runs::

        with mha_ext.settings(cpu_gemm="native"):
            out = mha_ext.scaled_dot_product_attention(q, k, v)
    """
    previous = current_settings()
    try:
        for name, value in overrides.items():
            _set(name, value)
        yield current_settings()
    finally:
        for name, value in previous.items():
            _set(name, value)
