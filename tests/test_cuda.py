"""The CUDA kernels against the CPU kernels on the same inputs, plus what only a GPU can show: gradcheck on
CUDA, bitwise determinism, device errors, torch.compile, streams and a compute-sanitizer memcheck.

The CPU test files already run every test on CUDA too (conftest.DEVICES); everything here is skipped
without a GPU or without a CUDA build of mha_ext.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import mha_ext
from conftest import cuda_ready
from cuda_cases import (CASES, DTYPES, TENSOR_CORE_DTYPES, TENSOR_CORE_HEAD_DIMS, TENSOR_CORE_VARIANTS,
                        assert_results_close, check_dropout_forward_against_helper_mask,
                        check_forward_against_reference, check_gradcheck_float64, make_inputs, run, tensor_core_case)

pytestmark = pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or no CUDA build of mha_ext")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu(case, dtype):
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    cuda = run(*make_inputs(CASES[case], dtype, "cuda"))
    assert_results_close(cuda, cpu, dtype)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("variant", list(TENSOR_CORE_VARIANTS))
def test_tensor_core_forward_matches_reference(variant, E, Ev, dtype):
    check_forward_against_reference(tensor_core_case(variant, E, Ev), dtype, "cuda")


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("variant", list(TENSOR_CORE_VARIANTS))
def test_tensor_core_backward_matches_cpu(variant, E, Ev, dtype):
    case = tensor_core_case(variant, E, Ev)
    cpu = run(*make_inputs(case, dtype, "cpu"))
    cuda = run(*make_inputs(case, dtype, "cuda"))
    assert_results_close(cuda, cpu, dtype)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
def test_cuda_core_path_for_16_bit_dtypes_matches_tensor_cores(monkeypatch, dtype):
    inputs, grad_out = make_inputs(CASES["gqa"], dtype, "cuda")
    tensor_cores = run(inputs, grad_out)
    monkeypatch.setenv("MHA_EXT_CUDA_TENSOR_CORES", "0")
    cuda_cores = run(inputs, grad_out)
    assert_results_close(cuda_cores, tensor_cores, dtype)
    assert not torch.equal(cuda_cores["grad_key"], tensor_cores["grad_key"])


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", [(16, 40), (72, 64), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_forward_dropout_equals_reference_with_helper_mask(dtype, E, Ev, causal):
    check_dropout_forward_against_helper_mask(dtype, E, Ev, causal, "cuda")


def test_fully_masked_rows_are_zero_with_zero_gradients():
    inputs, grad_out = make_inputs(CASES["fully_masked_rows"], torch.float32, "cuda")
    results = run(inputs, grad_out)
    empty = ~inputs["attn_mask"].any(-1)  # (B, Hq, L)
    assert empty.any()
    assert torch.all(results["out"][empty] == 0)
    assert torch.all(results["lse"][empty] == float("-inf"))
    assert torch.all(results["grad_query"][empty] == 0)
    assert torch.all(results["weights"][empty] == 0)
    assert all(torch.isfinite(t).all() for name, t in results.items() if name != "lse")


def test_more_batch_heads_than_a_grid_dimension():
    # grid.numel = 70000 > 65535: the kernels loop over work items with a grid stride.
    case = dict(shape=(35000, 2, 2, 3, 5, 4, 4), mask="bool_padding", bias="per_head")
    cpu = run(*make_inputs(case, torch.float32, "cpu"))
    cuda = run(*make_inputs(case, torch.float32, "cuda"))
    assert_results_close(cuda, cpu, torch.float32)


@pytest.mark.parametrize("case", ["bool_plus_bias", "causal_L_gt_S", "gqa", "ev_ne_e"])
def test_gradcheck_float64_on_cuda(case):
    check_gradcheck_float64(CASES[case], "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic(dtype):
    inputs, grad_out = make_inputs(CASES["gqa"], dtype, "cuda", seed=3)
    first = run(inputs, grad_out)
    for _ in range(3):
        again = run(inputs, grad_out)
        for name in first:
            assert torch.equal(again[name], first[name]), name


def test_bias_gradient_is_summed_over_broadcast_dims():
    inputs, grad_out = make_inputs(CASES["strided_views"], torch.float64, "cuda")
    bias = inputs["attn_bias"]  # (Hq, 1, 1) expanded to (B, Hq, L, S) with stride 0
    base = bias[0, :, :1, :1].detach().clone().requires_grad_(True)
    args = dict(inputs, attn_bias=base)
    out = mha_ext.scaled_dot_product_attention(**args)
    (grad_base,) = torch.autograd.grad(out, base, grad_out)
    full = base.detach().expand_as(bias).clone().requires_grad_(True)
    out_full = mha_ext.scaled_dot_product_attention(**dict(inputs, attn_bias=full))
    (grad_full,) = torch.autograd.grad(out_full, full, grad_out)
    torch.testing.assert_close(grad_base, grad_full.sum(dim=(0, 2, 3), keepdim=True)[0], atol=1e-10, rtol=1e-10)


def test_current_stream_is_used():
    inputs, grad_out = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")
    expected = run(inputs, grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run(inputs, grad_out)
    side.synchronize()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_torch_compile_on_cuda():
    inputs, _ = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")

    def fn(q, k, v, mask, bias):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias) * 2

    args = [inputs[n] for n in ("query", "key", "value", "attn_mask", "attn_bias")]
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args))


def test_cpu_mask_with_cuda_query_names_the_argument():
    inputs, _ = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    cpu_mask = inputs["attn_mask"].cpu()
    with pytest.raises(ValueError, match="attn_mask must be on the query's device"):
        mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=cpu_mask)
    # The op itself (below the Python checks) reports it too.
    with pytest.raises(ValueError, match="attn_mask must be on the query's device"):
        torch.ops.mha_ext.attention_forward(q, k, v, cpu_mask, None, "none", 1.0)
    with pytest.raises(ValueError, match="attn_bias must be on the query's device"):
        torch.ops.mha_ext.attention_forward(q, k, v, None, inputs["attn_bias"].cpu(), "none", 1.0)


@pytest.mark.parametrize("E, Ev, name", [(300, 16, "query's head dim E"), (16, 257, "value's head dim Ev")])
def test_head_dims_above_256_are_refused(E, Ev, name):
    q = torch.randn(1, 1, 4, E, device="cuda")
    k = torch.randn(1, 1, 4, E, device="cuda")
    v = torch.randn(1, 1, 4, Ev, device="cuda")
    with pytest.raises(ValueError, match=rf"{name} \(last dim\) must be at most 256, got {max(E, Ev)}"):
        mha_ext.scaled_dot_product_attention(q, k, v)


MEMCHECK_SCRIPT = """
import torch, mha_ext
g = torch.Generator(device="cuda").manual_seed(0)
for dtype, E, Ev in ((torch.float16, 40, 24), (torch.float32, 256, 130), (torch.float64, 8, 8)):
    q = torch.randn(2, 4, 37, E, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 53, E, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 53, Ev, device="cuda", generator=g).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 37, 53, device="cuda", generator=g) > 0.3
    bias = torch.randn(4, 1, 53, device="cuda", generator=g).to(dtype).requires_grad_()
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                               enable_gqa=True)
    out.backward(torch.randn_like(out))
    mha_ext.attention_weights(q.detach(), k.detach(), attn_mask=mask, attn_bias=bias.detach(), enable_gqa=True)
torch.cuda.synchronize()
print("memcheck-script-done")
"""


def compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found is None:
        from torch.utils.cpp_extension import CUDA_HOME

        candidate = os.path.join(CUDA_HOME or "", "bin", "compute-sanitizer")
        found = candidate if os.path.isfile(candidate) else None
    return found


def test_compute_sanitizer_memcheck():
    tool = compute_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", MEMCHECK_SCRIPT],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "memcheck-script-done" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
