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


@pytest.mark.slow
@pytest.mark.parametrize("module", ["mha_ext.info", "mha_ext"])
def test_command_line_entry_points_run(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch (built against)" in result.stdout
    if module == "mha_ext":
        assert "all checks passed" in result.stdout and "[ok] seed 004 worked example" in result.stdout


def run_python(code, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.slow
def test_jit_load_after_the_installed_build_raises_instead_of_aborting():
    # torch registers the mha_ext ops once per process: loading a second build used to abort the interpreter.
    result = run_python(
        "import mha_ext.jit\n"
        "try:\n"
        "    mha_ext.jit.load()\n"
        "except RuntimeError as error:\n"
        "    print('raised:', error)\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raised: mha_ext.jit.load(): this process has already loaded mha_ext's installed build" in result.stdout
    assert "MHA_EXT_JIT=1" in result.stdout


def test_jit_without_sources_says_a_checkout_is_needed(monkeypatch, tmp_path):
    monkeypatch.setattr(_loader, "_module", None)  # as at import, before anything is loaded
    monkeypatch.setattr(_loader._sources, "CSRC", str(tmp_path / "csrc"))
    import mha_ext.jit

    with pytest.raises(ImportError, match=r"MHA_EXT_JIT=1 compiles mha_ext's C\+\+/CUDA sources, which this "
                                          r"installation does not include .* `pip install --no-build-isolation -e \.`"):
        mha_ext.jit.load()
    # Nor is JIT recommended where it cannot work.
    monkeypatch.setattr(_loader.torch, "__version__", "2.14.1")
    with pytest.raises(ImportError) as caught:
        _loader.check_torch_version("2.13.0")
    assert "MHA_EXT_JIT" not in str(caught.value)


@pytest.mark.slow
def test_a_regular_install_imports_and_refuses_jit_clearly(tmp_path):
    # A non-editable install, as `pip install --no-build-isolation .` makes it (into a folder here): it imports
    # from there, without this checkout; MHA_EXT_JIT=1 says it needs the sources. The build folder under
    # build/ keeps this from recompiling what the editable install already compiled.
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                              "--target", str(target), ROOT], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {"PYTHONPATH": str(target)}
    imported = run_python("import mha_ext, torch; q = torch.randn(1, 2, 3, 4);"
                          "torch.testing.assert_close(mha_ext.scaled_dot_product_attention(q, q, q),"
                          " torch.nn.functional.scaled_dot_product_attention(q, q, q)); print(mha_ext.__file__)",
                          env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.strip() == str(target / "mha_ext" / "__init__.py")
    jit = run_python("import mha_ext", env={**env, "MHA_EXT_JIT": "1"}, cwd=tmp_path)
    assert jit.returncode != 0 and "which this installation does not include" in jit.stderr
    assert "Traceback" in jit.stderr and "Fatal" not in jit.stderr


def test_dev_sh_refuses_an_unknown_job_before_any_setup(tmp_path):
    venv = tmp_path / "venv"
    result = subprocess.run(["bash", os.path.join(ROOT, "dev.sh"), "nosuchjob"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "MHA_EXT_VENV": str(venv)})
    assert result.returncode == 2 and "usage: ./dev.sh [run|test|bench|setup]" in result.stderr
    assert not venv.exists()  # nothing was set up


@pytest.mark.slow
def test_avx512_row_passes_compile_without_warnings(tmp_path):
    # GCC 12 warned 47 times about its own AVX-512 intrinsics here; a clean build prints none of ours.
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{_loader._sources.CSRC}"]
    source = os.path.join(_loader._sources.CSRC, "cpu", "row_ops_avx512.cpp")
    result = subprocess.run(["c++", "-std=c++20", "-fPIC", *_loader._sources.cxx_flags(), *includes, "-c", source,
                             "-o", str(tmp_path / "row_ops_avx512.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-3000:]
