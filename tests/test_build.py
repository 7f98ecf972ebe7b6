"""The build's face: import-time refusals, build information, the self-check main job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mha_ext
from mha_ext import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_without_avx2_is_refused_at_import(monkeypatch):
    monkeypatch.setattr(_loader, "cpu_supports_avx2_fma", lambda: False)
    monkeypatch.setattr(_loader._sources, "is_x86_64", lambda: True)
    with pytest.raises(ImportError, match="lacks AVX2/FMA/F16C"):
        _loader.check_cpu()


def test_build_for_another_torch_is_refused_naming_both_versions(monkeypatch):
    monkeypatch.setattr(_loader.torch, "__version__", "2.14.1+cu130")
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0\+cpu but torch 2\.14\.1\+cu130 is running"):
        _loader.check_torch_version("2.13.0+cpu")
    _loader.check_torch_version("2.14.1+cpu")  # the same release with another local tag is accepted


def test_build_info_names_what_was_built():
    info = mha_ext.build_info()
    assert set(info) == {"torch_version", "cpu_isa", "cpu_gemm", "cpu_bf16_products", "cuda", "cuda_archs"}
    assert info["cpu_gemm"] in ("blas", "native")
    assert info["cpu_bf16_products"] in ("vnni", "float")
    assert info["cpu_isa"].endswith(("row passes avx2", "row passes avx512", "row passes avx512+bf16",
                                     "row passes baseline"))
    assert info["torch_version"] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("module", ["mha_ext.info", "mha_ext"])
def test_command_line_entry_points_run(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch (built against)" in result.stdout
    if module == "mha_ext":
        assert "all checks passed" in result.stdout and "[ok] seed 004 worked example" in result.stdout
