"""The emulator of the CUDA kernels (tests/cuda_emulator, docs/cuda.md "Testing without a GPU") itself, and
what only it can show: its checks of the CUDA language's rules, the other warp order, a part with less
shared memory. It runs each CUDA thread as a fiber, checks barrier convergence and WMMA's rules, and fills
shared memory with NaN before each block; it does not model timing (races and speed are for a GPU)."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.backends import EMULATOR_MARKS
from helpers.cases import CASES, assert_results_close, make_inputs, run, tensor_core_case
from helpers.emulator import emulated_cuda_kernels

pytestmark = EMULATOR_MARKS


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


def test_the_ops_run_the_emulated_cuda_backend_inside_the_override(emulator):
    inputs, grad_out = make_inputs(CASES["plain"], torch.float32, "cpu")
    explain_args = {name: inputs[name] for name in ("query", "key", "value")}
    assert mha_ext.explain(**explain_args).backend == "cpu"
    launches = emulator.launches()
    with emulated_cuda_kernels():
        explained = mha_ext.explain(**explain_args)
        run(inputs, grad_out)
    assert explained.backend == "cuda" and explained.facts["device"].startswith("the CPU emulator of the tests")
    assert emulator.launches() > launches
    assert mha_ext.explain(**explain_args).backend == "cpu"  # the CPU kernels are back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["multi_tile", "gqa_causal", "bool_plus_bias", "head_dim_256"])
def test_emulated_cuda_matches_cpu_with_warps_in_reverse(emulator, monkeypatch, case, dtype):
    # The other warp order shows a missing barrier where the last warp reads what the first writes.
    monkeypatch.setenv("MHA_EXT_EMULATOR_WARP_ORDER", "reverse")
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    with emulated_cuda_kernels():
        emulated = run(*make_inputs(CASES[case], dtype, "cpu"))
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


@pytest.mark.parametrize("variant", ["bool_padding_bias_full", "causal_L_gt_S"])
def test_emulated_head_dim_256_runs_on_tensor_cores_only_where_shared_memory_allows(emulator, monkeypatch,
                                                                                      variant):
    # Head dims 129..256 take 145-157 KiB of shared memory on tensor cores: an H100 or A100 runs them there,
    # a 99 KiB part (sm86/sm89, emulated by MHA_EXT_EMULATOR_SHARED_BYTES) on CUDA cores, bitwise the same
    # as with setting cuda_tensor_cores off; mha_ext.explain says which and why.
    inputs, grad_out = make_inputs(tensor_core_case(variant, 256, 232), torch.bfloat16, "cpu")
    explain_args = {name: inputs[name] for name in ("query", "key", "value", "attn_mask", "attn_bias", "is_causal")}
    cpu = run(inputs, grad_out)
    with emulated_cuda_kernels():
        assert mha_ext.explain(**explain_args).forward.kernel.startswith("tensor cores")
        tensor_cores = run(inputs, grad_out)
        monkeypatch.setenv("MHA_EXT_EMULATOR_SHARED_BYTES", str(99 * 1024))
        explained = mha_ext.explain(**explain_args)
        assert explained.forward.kernel.startswith("CUDA cores") and explained.backward.kernel.startswith("CUDA cores")
        assert "KiB of shared memory per block, more than this device allows" in explained.forward.not_taken["tensor cores"]
        small_part = run(inputs, grad_out)
        with mha_ext.settings(cuda_tensor_cores=False):
            assert mha_ext.explain(**explain_args).forward.not_taken["tensor cores"] == "setting cuda_tensor_cores is off"
            cuda_cores = run(inputs, grad_out)
    assert_results_close(tensor_cores, cpu, torch.bfloat16, device_type="cpu")
    # Not "weights": their LSE pass takes a one-column V, whose tiles fit 99 KiB on tensor cores.
    for name in cpu.keys() - {"weights"}:
        assert torch.equal(small_part[name], cuda_cores[name]), name
    assert not torch.equal(tensor_cores["grad_query"], cuda_cores["grad_query"])


