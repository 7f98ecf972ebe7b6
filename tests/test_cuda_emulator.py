"""The emulator of the CUDA kernels (tests/cuda_emulator, docs/cuda.md "Testing without a GPU") itself, and
what only it can show: its checks of the CUDA language's rules, the other warp order, a part with less
shared memory. It runs each CUDA thread as a fiber, checks barrier convergence and the rules of the
warp-wide sm80 instructions, and fills shared memory with NaN before each block; it does not model timing
(races and speed are for a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

import mha_ext
from helpers.backends import EMULATOR_MARKS
from helpers.cases import (CASES, TENSOR_CORE_DTYPES, TENSOR_CORE_VARIANTS, assert_results_close,
                           check_forward_against_reference, make_inputs, run, tensor_core_case)
from helpers.emulator import emulated_cuda_kernels

pytestmark = EMULATOR_MARKS


def _explain_args(inputs):
    """What mha_ext.explain takes of a call's inputs."""
    return {name: inputs[name] for name in ("query", "key", "value", "attn_mask", "attn_bias", "is_causal")}


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


# The sm80 instructions (csrc/cuda/ptx.cuh, tests/cuda_emulator/ptx.cpp). The expected values come from the
# PTX ISA's fragment layouts, with groupID g = lane // 4 and threadID_in_group t = lane % 4.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulator_mma_m16n8k16_multiplies_the_ptx_fragments(emulator, dtype):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=generator).to(dtype)
    b = torch.randn(16, 8, generator=generator).to(dtype)
    c = torch.randn(16, 8, generator=generator)
    d = emulator.check_mma(a, b, c)
    for warp in d:
        torch.testing.assert_close(warp, a.float() @ b.float() + c, rtol=1e-5, atol=1e-5)


def _word(low, high):
    """A 32-bit register of two 16-bit numbers, the first in the low half, as int32 (the tensors' type)."""
    word = low | high << 16
    return word - (1 << 32) if word >= 1 << 31 else word


def _ldmatrix_registers(count, trans, row_bytes, number):
    """Each lane's registers of an ldmatrix whose matrix i has row r at byte (8 i + r) row_bytes of shared
    memory, which holds number(j) at its j-th 16-bit element: register i of lane l is row g, elements 2t and
    2t + 1 of matrix i (transposed: column g, rows 2t and 2t + 1)."""
    def element(row, column):
        return number(row * row_bytes // 2 + column)
    registers = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        if trans:
            registers.append([_word(element(8 * i + 2 * t, g), element(8 * i + 2 * t + 1, g)) for i in range(count)])
        else:
            registers.append([_word(element(8 * i + g, 2 * t), element(8 * i + g, 2 * t + 1)) for i in range(count)])
    return torch.tensor(registers, dtype=torch.int32)


@pytest.mark.parametrize("trans", [False, True], ids=["rows", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_emulator_ldmatrix_distributes_rows_as_ptx_lays_them_out(emulator, count, trans):
    # Rows 48 bytes apart in shared memory numbered 0, 1, 2, ...; lanes from 8 count on give no address.
    registers = emulator.check_ldmatrix(count, trans, 48)[:, :count]
    expected = _ldmatrix_registers(count, trans, 48, lambda j: j)
    assert torch.equal(registers, expected.repeat(4, 1))  # every warp the same


def test_emulator_checks_ldmatrix_row_alignment(emulator):
    with pytest.raises(RuntimeError, match=r"ldmatrix in block 0, warp 0: thread 1's shared-memory address "
                                           r"\(byte 8\) is not 16-byte aligned"):
        emulator.check_ldmatrix(1, False, 8)


@pytest.mark.parametrize("row_bytes, extra_per_matrix", [(128, 7), (144, 0)])
def test_emulator_counts_ldmatrix_bank_conflicts(emulator, row_bytes, extra_per_matrix):
    # Rows 128 bytes apart all fall on banks 0-3 (8-way: 7 extra wavefronts per matrix); 16 bytes of padding
    # per row spread a matrix's 8 rows over all 32 banks.
    emulator.reset_bank_conflicts()
    emulator.check_ldmatrix(4, False, row_bytes)
    warps = 4
    assert emulator.bank_conflicts() == {"ldmatrix": (warps, warps * 4 * extra_per_matrix),
                                         "ldmatrix.trans": (0, 0), "cp.async": (0, 0)}


def test_emulator_cp_async_lands_at_the_wait_with_zero_fill(emulator):
    # Thread t copies chunk t (16 bytes) of a 100-chunk source, zeros from thread 100 on; after the wait and a
    # __syncthreads, each warp loads its 32 chunks by ldmatrix.x4, lane j giving the address of chunk j.
    source = torch.arange(100 * 8, dtype=torch.int16)
    shared = torch.cat([source, torch.zeros(28 * 8, dtype=torch.int16)]).tolist()
    emulator.reset_bank_conflicts()
    registers = emulator.check_cp_async("waited", source)[:, :4]
    expected = torch.cat([_ldmatrix_registers(4, False, 16, lambda j, w=w: shared[w * 32 * 8 + j]) for w in range(4)])
    assert torch.equal(registers, expected)
    conflicts = emulator.bank_conflicts()
    assert conflicts["cp.async"] == (4, 0) and conflicts["ldmatrix"] == (4, 0)  # consecutive chunks


def test_emulator_cp_async_wait_group_lands_only_older_committed_groups(emulator):
    # out[t]: a word of thread t's copy of group 0, 1 after wait_group 1; of group 1, then of an uncommitted
    # copy, after wait_group 0; of that copy after commit and wait_group 0. Unlanded bytes are 0xff.
    source = torch.arange(3 * 128 * 8, dtype=torch.int16)
    out = emulator.check_cp_async("groups", source)
    threads = torch.arange(128)

    def landed(group):
        chunk = group * 128 + threads
        return (chunk * 8 | (chunk * 8 + 1) << 16).int()

    unlanded = torch.full((128,), -1, dtype=torch.int32)
    for column, expected in enumerate([landed(0), unlanded, landed(1), unlanded, landed(2)]):
        assert torch.equal(out[:, column], expected), column


@pytest.mark.parametrize("scenario, message", [
    ("not_waited", "ldmatrix in block 0, warp 0: thread 0's row is shared memory bytes 0-15, which a cp.async of "
                   "thread 0 writes and which has not been waited for"),
    ("without_barrier", "ldmatrix in block 0, warp 1: thread 32's row is shared memory bytes 0-15, which a "
                        "cp.async of thread 0 wrote: read before a __syncthreads"),
    ("overlapping", "cp.async in block 0, warp 0: thread 0 copies to shared memory bytes 0-15, which an earlier "
                    "cp.async of thread 0 still writes"),
    ("never_waited", "block 0, thread 0 exited with 1 cp.async never waited for"),
])
def test_emulator_reports_cp_async_races(emulator, scenario, message):
    source = torch.arange(128 * 8, dtype=torch.int16)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        emulator.check_cp_async(scenario, source)


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


@pytest.mark.parametrize("variant, backward_bytes", [("plain", 99 * 1024), ("bool_padding_bias_full", 84480)])
def test_emulated_head_dim_256_runs_on_tensor_cores_in_99_kib_of_shared_memory(emulator, monkeypatch, variant,
                                                                               backward_bytes):
    # Head dim 256's tiles take at most the 99 KiB of the smallest sm80+ parts (sm86/sm89, emulated by
    # MHA_EXT_EMULATOR_SHARED_BYTES): the forward's exactly, the backward's exactly in the plain variant
    # and 82.5 KiB in the masked one (half as many streamed rows). They run on tensor cores there, the
    # backward's dK/dV in two passes; a part with less would run those that do not fit on CUDA cores, and
    # mha_ext.explain says which and why.
    inputs, grad_out = make_inputs(tensor_core_case(variant, 256, 232), torch.bfloat16, "cpu")
    explain_args = _explain_args(inputs)
    cpu = run(inputs, grad_out)
    with emulated_cuda_kernels():
        monkeypatch.setenv("MHA_EXT_EMULATOR_SHARED_BYTES", str(99 * 1024))
        explained = mha_ext.explain(**explain_args)
        assert explained.forward.kernel.startswith("tensor cores (forward_mma_kernel)")
        assert explained.backward.kernel.startswith("tensor cores (backward_mma_kernel)")
        assert "dV and dK in two passes" in explained.backward.tiles
        tensor_cores = run(inputs, grad_out)
        monkeypatch.setenv("MHA_EXT_EMULATOR_SHARED_BYTES", str(99 * 1024 - 1))
        explained = mha_ext.explain(**explain_args)
        assert explained.forward.kernel.startswith("CUDA cores")
        assert "99 KiB of shared memory per block, more than this device allows" in explained.forward.not_taken[
            "tensor cores"]
        assert explained.backward.kernel.startswith("CUDA cores" if backward_bytes > 99 * 1024 - 1 else "tensor cores")
        small_part = run(inputs, grad_out)
    assert_results_close(tensor_cores, cpu, torch.bfloat16, device_type="cpu")
    assert_results_close(small_part, cpu, torch.bfloat16, device_type="cpu")
    assert not torch.equal(tensor_cores["out"], small_part["out"])  # other forward kernels ran


# ---- The tensor-core forward (csrc/cuda/forward_mma_kernel.cuh) on the emulated mma.sync, ldmatrix, cp.async ----

@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("variant", list(TENSOR_CORE_VARIANTS))
def test_emulated_tensor_core_forward_matches_reference_with_warps_in_reverse(emulator, monkeypatch, variant, dtype):
    # The other warp order shows a missing barrier around the cp.async tiles (test_cuda_kernels.py runs
    # the same grid first to last).
    monkeypatch.setenv("MHA_EXT_EMULATOR_WARP_ORDER", "reverse")
    with emulated_cuda_kernels():
        check_forward_against_reference(tensor_core_case(variant, 72, 40), dtype, "cpu")


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("variant", ["plain", "bool_padding_bias_full", "fully_masked_rows", "float32_mask_row_bias",
                                     "causal_L_gt_S", "causal_lower_right_L_lt_S", "single_query"])
@pytest.mark.parametrize("E, Ev", [(72, 40), (136, 200)])
def test_emulated_tensor_core_backward_matches_cpu_with_warps_in_reverse(emulator, monkeypatch, variant, E, Ev, dtype):
    # The mma.sync backward in the other warp order, with dK and dV in one pass (head dims up to 128) and in
    # two (above).
    monkeypatch.setenv("MHA_EXT_EMULATOR_WARP_ORDER", "reverse")
    case = tensor_core_case(variant, E, Ev)
    cpu = run(*make_inputs(case, dtype, "cpu"))
    with emulated_cuda_kernels():
        emulated = run(*make_inputs(case, dtype, "cpu"))
    assert_results_close(emulated, cpu, dtype, device_type="cpu")


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("case", ["plain", "causal_L_gt_S", "bool_padding_bias_full"])
@pytest.mark.parametrize("E, Ev", [(64, 64), (128, 128), (256, 256), (40, 72)])
def test_emulated_tensor_core_kernels_have_no_shared_memory_bank_conflicts(emulator, case, E, Ev, dtype):
    # Every ldmatrix and cp.async of the forward and of the backward is one wavefront per phase: the
    # padded rows put the 8 rows of a phase on distinct banks.
    inputs, grad_out = make_inputs(tensor_core_case(case, E, Ev), dtype, "cpu")
    with emulated_cuda_kernels():
        emulator.reset_bank_conflicts()
        run(inputs, grad_out)
        counts = emulator.bank_conflicts()
    assert set(counts) == {"ldmatrix", "ldmatrix.trans", "cp.async"}
    assert all(accesses > 0 and extra == 0 for accesses, extra in counts.values()), counts


def _unaligned_copy(t):
    """The same values in storage that starts 2 bytes past a 16-byte boundary (rows no longer 16-byte aligned)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return storage.view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("case", ["plain", "bool_padding_bias_full", "causal_lower_right_L_gt_S"])
def test_emulated_tensor_core_kernels_stage_unaligned_rows_in_chunks(emulator, case, dtype):
    # Rows that do not start on 16 bytes cannot be cp.async chunks: the launchers copy them into aligned,
    # zero-padded buffers first (chunked_rows.cuh), so forward and backward give bitwise the same results.
    inputs, grad_out = make_inputs(tensor_core_case(case, 64, 64), dtype, "cpu")
    unaligned_inputs = dict(inputs, **{name: _unaligned_copy(inputs[name]) for name in ("query", "key", "value")})
    assert all(unaligned_inputs[name].data_ptr() % 16 != 0 for name in ("query", "key", "value"))
    with emulated_cuda_kernels():
        aligned = run(inputs, grad_out)
        unaligned = run(unaligned_inputs, _unaligned_copy(grad_out))
    assert aligned.keys() == unaligned.keys()
    for name in aligned:
        assert torch.equal(aligned[name], unaligned[name]), name


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("variant", ["plain", "bool_padding_bias_full", "causal_L_gt_S"])
@pytest.mark.parametrize("E, Ev", [(36, 20), (130, 4)])
def test_emulated_tensor_core_kernels_take_head_dims_that_are_not_multiples_of_8(emulator, variant, E, Ev, dtype):
    # Such rows are not whole 16-byte chunks either: staged with zero padding, which adds 0 to every product.
    case = tensor_core_case(variant, E, Ev)
    cpu = run(*make_inputs(case, dtype, "cpu"))
    with emulated_cuda_kernels():
        assert mha_ext.explain(**_explain_args(make_inputs(case, dtype, "cpu")[0])).backward.kernel.startswith(
            "tensor cores (backward_mma_kernel)")
        emulated = run(*make_inputs(case, dtype, "cpu"))
    assert_results_close(emulated, cpu, dtype, device_type="cpu")
