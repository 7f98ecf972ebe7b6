"""mha_ext.explain (which kernel runs, and why not the others) and mha_ext.settings (switching between
kernels that compute the same thing): what they report must be what runs."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.reference import assert_close_to_reference, reference_attention


def qkv(L=70, S=90, E=32, Ev=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, L, E, generator=gen).to(dtype), torch.randn(2, 4, S, E, generator=gen).to(dtype),
            torch.randn(2, 4, S, Ev, generator=gen).to(dtype))


def test_float32_runs_float_products_and_says_why_not_bf16():
    explained = mha_ext.explain(*qkv())
    assert explained.backend == "cpu"
    assert explained.forward.kernel.startswith("float32 tile products")
    assert explained.forward.not_taken["bfloat16 tile products"] == "the inputs are not bfloat16"
    assert explained.backward.not_taken["bfloat16 tile products"] == "the inputs are not bfloat16"
    assert explained.forward.tiles.startswith("64 query rows x 512 keys")
    assert set(explained.facts) == {"cpu_gemm", "row passes", "bfloat16 products", "threads"}


def test_decode_sized_query_takes_the_decode_path():
    explained = mha_ext.explain(*qkv(L=1, dtype=torch.bfloat16))
    assert explained.forward.kernel.startswith("decode:")
    assert "decode-sized query" in explained.forward.not_taken["bfloat16 tile products"]
    assert "decode path" not in explained.forward.not_taken


def test_bfloat16_choice_follows_onednn_and_the_cpu():
    q, k, v = qkv(dtype=torch.bfloat16)
    explained = mha_ext.explain(q, k, v)
    vnni = mha_ext.build_info()["cpu_bf16_products"] == "vnni"
    assert explained.forward.kernel.startswith("bfloat16 tile products" if vnni else "float32 tile products")
    with torch.backends.mkldnn.flags(enabled=False):
        off = mha_ext.explain(q, k, v)
    assert off.forward.not_taken["bfloat16 tile products"] == "oneDNN is off (torch.backends.mkldnn.enabled is False)"
    odd = mha_ext.explain(*qkv(E=33, Ev=33, dtype=torch.bfloat16))
    assert "E is odd" in odd.forward.not_taken["bfloat16 tile products"]


def test_settings_change_what_runs_and_come_back():
    q, k, v = qkv()
    expected = reference_attention(q, k, v)
    with mha_ext.settings(cpu_gemm="native", cpu_isa="avx2") as now:
        assert now == {"cpu_gemm": "native", "cpu_isa": "avx2", "cuda_tensor_cores": True}
        explained = mha_ext.explain(q, k, v)
        assert explained.forward.kernel == "float32 tile products on the built-in vectorised GEMM"
        assert explained.facts["cpu_gemm"] == "native" and explained.facts["row passes"] == "avx2"
        assert_close_to_reference(mha_ext.scaled_dot_product_attention(q, k, v), expected, torch.float32)
        with mha_ext.settings(cpu_gemm="blas"):  # nested scopes restore in order
            assert mha_ext.current_settings()["cpu_gemm"] == "blas"
        assert mha_ext.current_settings()["cpu_gemm"] == "native"
    assert mha_ext.current_settings() == {"cpu_gemm": "blas", "cpu_isa": "auto", "cuda_tensor_cores": True}


def test_settings_come_back_after_an_exception_and_refuse_bad_values():
    with pytest.raises(KeyError):
        with mha_ext.settings(cuda_tensor_cores=False):
            raise KeyError("inside")
    assert mha_ext.current_settings()["cuda_tensor_cores"] is True
    with pytest.raises(ValueError, match=r"cpu_gemm must be one of \('blas', 'native'\), got 'mkl'"):
        with mha_ext.settings(cpu_gemm="mkl"):
            pass
    with pytest.raises(ValueError, match=r"cuda_tensor_cores must be one of \(True, False\), got 0"):
        with mha_ext.settings(cuda_tensor_cores=0):
            pass
    with pytest.raises(TypeError, match=r"no setting named 'gemm'"):
        with mha_ext.settings(gemm="native"):
            pass
    assert mha_ext.current_settings() == {"cpu_gemm": "blas", "cpu_isa": "auto", "cuda_tensor_cores": True}


def test_explain_checks_its_arguments_like_the_attention_call():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key's last dim must equal query's head dim E = 32"):
        mha_ext.explain(q, k[..., :5], v)
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor"):
        mha_ext.explain(q.numpy(), k, v)


def test_explanation_prints_every_choice():
    text = str(mha_ext.explain(*qkv(), is_causal="lower_right"))
    for line in ("backend: cpu", "forward: float32 tile products", "backward: float32 tile products",
                 "  not bfloat16 tile products: the inputs are not bfloat16", "cpu_gemm: "):
        assert line in text, text
