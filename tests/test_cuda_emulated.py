"""The CUDA kernels, run on the CPU by the emulator (tests/cuda_emulator, docs/cuda.md "Testing without a
GPU"), against the CPU kernels and the fp64 reference on the same inputs: what a GPU-less machine can show
of them. The emulator runs each CUDA thread as a fiber, checks barrier convergence and WMMA's alignment
rules, and fills shared memory with NaN before each block; it does not model timing, so races and speed
are for test_cuda.py on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

import mha_ext
from cuda_cases import (CASES, DTYPES, TENSOR_CORE_DTYPES, TENSOR_CORE_VARIANTS, assert_results_close,
                        check_dropout_forward_against_helper_mask, check_forward_against_reference,
                        check_gradcheck_float64, make_inputs, randn, run, tensor_core_case)
from emulated_cuda import emulated_cuda_kernels, load

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator's fibers use Linux's ucontext"),
    # Putting the emulated kernels behind the CPU key overrides the CPU kernels, which torch warns about.
    pytest.mark.filterwarnings("ignore:Warning only once for all operators:UserWarning"),
]


@pytest.fixture(scope="module")
def emulator():
    return load()


def test_emulator_runs_shuffles_and_votes(emulator):
    lanes = torch.arange(128)
    expected = (lanes ^ 5) * 4 + 2  # the xor-5 partner's index, __syncthreads_or true, then false
    assert torch.equal(emulator.self_check("shuffle_and_vote"), expected.float())


def test_emulator_reports_divergent_barriers(emulator):
    with pytest.raises(RuntimeError, match="deadlock in block 0"):
        emulator.self_check("divergent_barrier")


def test_emulator_shared_memory_starts_as_nan(emulator):
    assert torch.isnan(emulator.self_check("unwritten_shared_read")).all()


def test_emulator_shows_a_missing_barrier_in_one_warp_order(emulator, monkeypatch):
    # Warp 0 reads what warp 3 writes without a __syncthreads: run first, it reads NaN.
    out = emulator.self_check("missing_barrier")
    assert torch.isnan(out[:32]).all() and (out[32:] == 1).all()
    monkeypatch.setenv("MHA_EXT_EMULATOR_WARP_ORDER", "reverse")
    assert (emulator.self_check("missing_barrier") == 1).all()


def test_emulator_reports_writes_past_shared_memory(emulator):
    with pytest.raises(RuntimeError, match="wrote shared memory byte 256, past the 256 bytes"):
        emulator.self_check("shared_overrun")


def test_emulator_checks_wmma_alignment(emulator):
    with pytest.raises(RuntimeError, match="store_matrix_sync: the pointer is not 256-bit aligned"):
        emulator.self_check("misaligned_wmma")


def test_emulator_checks_that_wmma_arguments_are_warp_uniform(emulator):
    with pytest.raises(RuntimeError, match="load_matrix_sync: the lanes of a warp pass different pointers"):
        emulator.self_check("divergent_wmma_pointer")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_cuda_matches_cpu(emulator, case, dtype):
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    launches = emulator.launches()
    with emulated_cuda_kernels():
        emulated = run(*make_inputs(CASES[case], dtype, "cpu"))
    assert emulator.launches() > launches or CASES[case]["shape"][3] == 0  # L = 0 launches nothing
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["multi_tile", "gqa_causal", "bool_plus_bias", "head_dim_256"])
def test_emulated_cuda_matches_cpu_with_warps_in_reverse(emulator, monkeypatch, case, dtype):
    # The other warp order shows a missing barrier where the last warp reads what the first writes.
    monkeypatch.setenv("MHA_EXT_EMULATOR_WARP_ORDER", "reverse")
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    with emulated_cuda_kernels():
        emulated = run(*make_inputs(CASES[case], dtype, "cpu"))
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


# Head dims in and out of multiples of the 16-wide WMMA tiles, in all three buckets, E != Ev both ways.
EMULATED_TENSOR_CORE_HEAD_DIMS = [(16, 16), (40, 72), (72, 16), (128, 128), (128, 40), (200, 136)]


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", EMULATED_TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("variant", list(TENSOR_CORE_VARIANTS))
def test_emulated_tensor_core_forward_matches_reference(emulator, variant, E, Ev, dtype):
    with emulated_cuda_kernels():
        check_forward_against_reference(tensor_core_case(variant, E, Ev), dtype, "cpu")


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", EMULATED_TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("variant", ["plain", "bool_padding_bias_full", "strided_expanded", "fully_masked_rows",
                                     "float32_mask_row_bias", "causal_L_lt_S", "causal_L_gt_S",
                                     "causal_lower_right_L_lt_S", "causal_lower_right_L_gt_S", "single_query"])
def test_emulated_tensor_core_backward_matches_cpu(emulator, variant, E, Ev, dtype):
    inputs, grad_out = make_inputs(tensor_core_case(variant, E, Ev), dtype, "cpu")
    cpu = run(inputs, grad_out)
    with emulated_cuda_kernels():
        emulated = run(inputs, grad_out)
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


@pytest.mark.parametrize("variant", ["bool_padding_bias_full", "causal_L_gt_S"])
def test_emulated_head_dim_256_runs_on_tensor_cores_only_where_shared_memory_allows(emulator, monkeypatch,
                                                                                      variant):
    # Head dims 129..256 take 145-157 KiB of shared memory on tensor cores: an H100 or A100 runs them there,
    # a 99 KiB part (sm86/sm89, emulated by MHA_EXT_EMULATOR_SHARED_BYTES) on CUDA cores, bitwise the same
    # as MHA_EXT_CUDA_TENSOR_CORES=0.
    inputs, grad_out = make_inputs(tensor_core_case(variant, 256, 232), torch.bfloat16, "cpu")
    cpu = run(inputs, grad_out)
    with emulated_cuda_kernels():
        tensor_cores = run(inputs, grad_out)
        monkeypatch.setenv("MHA_EXT_EMULATOR_SHARED_BYTES", str(99 * 1024))
        small_part = run(inputs, grad_out)
        monkeypatch.setenv("MHA_EXT_CUDA_TENSOR_CORES", "0")
        cuda_cores = run(inputs, grad_out)
    assert_results_close(tensor_cores, cpu, torch.bfloat16, device_type="cpu")
    # Not "weights": their LSE pass takes a one-column V, whose tiles fit 99 KiB on tensor cores.
    for name in cpu.keys() - {"weights"}:
        assert torch.equal(small_part[name], cuda_cores[name]), name
    assert not torch.equal(tensor_cores["grad_query"], cuda_cores["grad_query"])


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
def test_emulated_cuda_core_path_for_16_bit_dtypes(emulator, monkeypatch, dtype):
    # MHA_EXT_CUDA_TENSOR_CORES=0 runs fp16/bf16 on the CUDA-core kernels: the same results within the
    # tolerance, from other kernels (not bitwise the same).
    inputs, grad_out = make_inputs(CASES["gqa"], dtype, "cpu")
    with emulated_cuda_kernels():
        tensor_cores = run(inputs, grad_out)
        monkeypatch.setenv("MHA_EXT_CUDA_TENSOR_CORES", "0")
        cuda_cores = run(inputs, grad_out)
    assert_results_close(cuda_cores, tensor_cores, dtype, device_type="cpu")
    assert not torch.equal(cuda_cores["grad_key"], tensor_cores["grad_key"])
    assert not torch.equal(cuda_cores["out"], tensor_cores["out"])


@pytest.mark.parametrize("dtype", [torch.float32, *TENSOR_CORE_DTYPES])
@pytest.mark.parametrize("E, Ev", [(16, 40), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_emulated_dropout_forward_equals_reference_with_helper_mask(emulator, dtype, E, Ev, causal):
    with emulated_cuda_kernels():
        check_dropout_forward_against_helper_mask(dtype, E, Ev, causal, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_dropout_decisions_and_gradients_equal_cpu(emulator, dtype):
    # The same seed gives the same decisions on both backends, so the forward and backward match too.
    gen = torch.Generator().manual_seed(11)
    q, k, v = (randn(gen, 2, 3, n, 24, dtype=dtype) for n in (37, 53, 53))
    grad_out = randn(gen, 2, 3, 37, 24, dtype=dtype)

    def dropout_run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        state = torch.Generator().manual_seed(3)
        keep = mha_ext.dropout_mask(q, k, 0.25, generator=state)
        state.manual_seed(3)
        out = mha_ext.scaled_dot_product_attention(*leaves, dropout_p=0.25, is_causal=True, generator=state)
        grads = torch.autograd.grad(out, leaves, grad_out)
        return dict(keep=keep, out=out.detach(), **{f"grad_{n}": g for n, g in zip("qkv", grads)})

    cpu = dropout_run()
    with emulated_cuda_kernels():
        emulated = dropout_run()
    assert torch.equal(emulated.pop("keep"), cpu.pop("keep"))
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


@pytest.mark.parametrize("case", ["bool_plus_bias", "causal_L_gt_S", "gqa", "ev_ne_e"])
def test_emulated_gradcheck_float64(emulator, case):
    # fast_mode: gradcheck along random directions, a few hundred emulated launches instead of thousands.
    with emulated_cuda_kernels():
        check_gradcheck_float64(CASES[case], "cpu", fast_mode=True)
