"""The CUDA backend's kernels against the CPU kernels and the fp64 reference on the same inputs, on each
backend that runs them: the CPU emulator (tests/cuda_emulator, always; marker emulator) and a GPU (where
there is one; marker gpu). What only one of them can show is in test_cuda_emulator.py / test_cuda_device.py.
"""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.backends import CUDA, CUDA_BACKENDS, EMULATED_CUDA, param
from helpers.cases import (CASES, DTYPES, TENSOR_CORE_DTYPES, TENSOR_CORE_HEAD_DIMS, TENSOR_CORE_VARIANTS,
                           assert_results_close, check_dropout_forward_against_helper_mask,
                           check_forward_against_reference, check_gradcheck_float64, make_inputs, randn, run,
                           tensor_core_case)

# The emulator takes seconds per case: it runs head dims in and out of multiples of the 16-wide WMMA tiles, in
# all three buckets, E != Ev both ways, and the backward on the variants that exercise its tiling; a GPU runs all.
EMULATED_HEAD_DIMS = [(16, 16), (40, 72), (72, 16), (128, 128), (128, 40), (200, 136)]
EMULATED_BACKWARD_VARIANTS = ["plain", "bool_padding_bias_full", "strided_expanded", "fully_masked_rows",
                              "float32_mask_row_bias", "causal_L_lt_S", "causal_L_gt_S", "causal_lower_right_L_lt_S",
                              "causal_lower_right_L_gt_S", "single_query"]


def tensor_core_params(variants_for):
    return [param(backend, variant, E, Ev)
            for backend, head_dims in ((EMULATED_CUDA, EMULATED_HEAD_DIMS), (CUDA, TENSOR_CORE_HEAD_DIMS))
            for variant in variants_for(backend) for E, Ev in head_dims]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_matches_cpu(backend, case, dtype):
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    with backend.active():
        got = run(*make_inputs(CASES[case], dtype, backend.device))
    assert_results_close(got, cpu, dtype, device_type=backend.device)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("backend, variant, E, Ev", tensor_core_params(lambda backend: list(TENSOR_CORE_VARIANTS)))
def test_tensor_core_forward_matches_reference(backend, variant, E, Ev, dtype):
    with backend.active():
        check_forward_against_reference(tensor_core_case(variant, E, Ev), dtype, backend.device)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("backend, variant, E, Ev", tensor_core_params(
    lambda backend: EMULATED_BACKWARD_VARIANTS if backend.emulated else list(TENSOR_CORE_VARIANTS)))
def test_tensor_core_backward_matches_cpu(backend, variant, E, Ev, dtype):
    case = tensor_core_case(variant, E, Ev)
    cpu = run(*make_inputs(case, dtype, "cpu"))
    with backend.active():
        got = run(*make_inputs(case, dtype, backend.device))
    assert_results_close(got, cpu, dtype, device_type=backend.device)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_core_path_for_16_bit_dtypes_matches_tensor_cores(backend, dtype):
    # Setting cuda_tensor_cores off runs fp16/bf16 on the CUDA-core kernels: the same results within the
    # tolerance, from other kernels (not bitwise the same); explain says which ran.
    inputs, grad_out = make_inputs(CASES["gqa"], dtype, backend.device)
    explain_args = {name: inputs[name] for name in ("query", "key", "value", "attn_mask", "attn_bias")}
    with backend.active():
        assert mha_ext.explain(**explain_args).forward.kernel.startswith("tensor cores")
        tensor_cores = run(inputs, grad_out)
        with mha_ext.settings(cuda_tensor_cores=False):
            assert mha_ext.explain(**explain_args).forward.kernel.startswith("CUDA cores")
            cuda_cores = run(inputs, grad_out)
    assert_results_close(cuda_cores, tensor_cores, dtype, device_type=backend.device)
    assert not torch.equal(cuda_cores["grad_key"], tensor_cores["grad_key"])
    assert not torch.equal(cuda_cores["out"], tensor_cores["out"])


@pytest.mark.parametrize("dtype", [torch.float32, *TENSOR_CORE_DTYPES])
@pytest.mark.parametrize("E, Ev", [(16, 40), (72, 64), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_dropout_forward_equals_reference_with_helper_mask(backend, dtype, E, Ev, causal):
    with backend.active():
        check_dropout_forward_against_helper_mask(dtype, E, Ev, causal, backend.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_dropout_decisions_and_gradients_equal_cpu(backend, dtype):
    # The same seed gives the same decisions on every backend, so the forward and backward match too.
    gen = torch.Generator().manual_seed(11)
    q, k, v = (randn(gen, 2, 3, n, 24, dtype=dtype) for n in (37, 53, 53))
    grad_out = randn(gen, 2, 3, 37, 24, dtype=dtype)

    def dropout_run(device):
        leaves = [t.detach().clone().to(device).requires_grad_(True) for t in (q, k, v)]
        state = torch.Generator().manual_seed(3)
        keep = mha_ext.dropout_mask(leaves[0], leaves[1], 0.25, generator=state)
        state.manual_seed(3)
        out = mha_ext.scaled_dot_product_attention(*leaves, dropout_p=0.25, is_causal=True, generator=state)
        grads = torch.autograd.grad(out, leaves, grad_out.to(device))
        return dict(keep=keep, out=out.detach(), **{f"grad_{n}": g for n, g in zip("qkv", grads)})

    cpu = dropout_run("cpu")
    with backend.active():
        got = dropout_run(backend.device)
    assert torch.equal(got.pop("keep").cpu(), cpu.pop("keep"))
    assert_results_close(got, cpu, dtype, device_type=backend.device)


@pytest.mark.parametrize("case", ["bool_plus_bias", "causal_L_gt_S", "gqa", "ev_ne_e"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_gradcheck_float64(backend, case):
    # fast_mode on the emulator: gradcheck along random directions, a few hundred launches instead of thousands.
    with backend.active():
        check_gradcheck_float64(CASES[case], backend.device, fast_mode=backend.emulated)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_gradients(backend):
    inputs, grad_out = make_inputs(CASES["fully_masked_rows"], torch.float32, backend.device)
    with backend.active():
        results = run(inputs, grad_out)
    empty = ~inputs["attn_mask"].any(-1)  # (B, Hq, L)
    assert empty.any()
    assert torch.all(results["out"][empty] == 0)
    assert torch.all(results["lse"][empty] == float("-inf"))
    assert torch.all(results["grad_query"][empty] == 0)
    assert torch.all(results["weights"][empty] == 0)
    assert all(torch.isfinite(t).all() for name, t in results.items() if name != "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bitwise_deterministic(backend, dtype):
    inputs, grad_out = make_inputs(CASES["gqa"], dtype, backend.device, seed=3)
    with backend.active():
        first = run(inputs, grad_out)
        again = run(inputs, grad_out)
    for name in first:
        assert torch.equal(again[name], first[name]), name


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bias_gradient_is_summed_over_broadcast_dims(backend):
    inputs, grad_out = make_inputs(CASES["strided_views"], torch.float64, backend.device)
    bias = inputs["attn_bias"]  # (Hq, 1, 1) expanded to (B, Hq, L, S) with stride 0
    base = bias[0, :, :1, :1].detach().clone().requires_grad_(True)
    full = base.detach().expand_as(bias).clone().requires_grad_(True)
    with backend.active():
        (grad_base,) = torch.autograd.grad(mha_ext.scaled_dot_product_attention(**dict(inputs, attn_bias=base)),
                                           base, grad_out)
        (grad_full,) = torch.autograd.grad(mha_ext.scaled_dot_product_attention(**dict(inputs, attn_bias=full)),
                                           full, grad_out)
    torch.testing.assert_close(grad_base, grad_full.sum(dim=(0, 2, 3), keepdim=True)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("E, Ev, name", [(300, 16, "query's head dim E"), (16, 257, "value's head dim Ev")])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_head_dims_above_256_are_refused(backend, E, Ev, name):
    q = torch.randn(1, 1, 4, E, device=backend.device)
    k = torch.randn(1, 1, 4, E, device=backend.device)
    v = torch.randn(1, 1, 4, Ev, device=backend.device)
    with backend.active(), pytest.raises(ValueError, match=rf"{name} \(last dim\) must be at most 256, got {max(E, Ev)}"):
        mha_ext.scaled_dot_product_attention(q, k, v)
