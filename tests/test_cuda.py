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
from conftest import TOLERANCES, cuda_ready, reference_attention

pytestmark = pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or no CUDA build of mha_ext")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def bool_mask(gen, *shape, p_attend=0.7):
    return torch.rand(*shape, generator=gen) < p_attend


# Each case builds its inputs on the CPU from a fixed seed; `on(device)` moves them and applies the same
# views there, so CPU and CUDA see the same values with the same strides (stride 0 included).
CASES = {
    "plain": dict(shape=(2, 3, 3, 17, 29, 16, 16)),
    "multi_tile": dict(shape=(1, 2, 2, 150, 300, 32, 32), mask="bool_2d", bias="full"),
    "bool_key_padding": dict(shape=(2, 4, 4, 33, 70, 24, 24), mask="bool_padding"),
    "bool_broadcast_rank3": dict(shape=(2, 4, 4, 33, 70, 24, 24), mask="bool_heads"),
    "float_mask_full": dict(shape=(2, 2, 2, 20, 45, 8, 8), mask="float_full"),
    "float32_mask_row_broadcast": dict(shape=(2, 2, 2, 20, 45, 8, 8), mask="float32_row"),
    "bool_plus_bias": dict(shape=(2, 4, 4, 40, 40, 32, 32), mask="bool_padding", bias="per_head"),
    "causal_L_lt_S": dict(shape=(2, 2, 2, 37, 90, 16, 16), causal=True),
    "causal_L_gt_S": dict(shape=(2, 2, 2, 90, 37, 16, 16), causal=True, mask="bool_2d", bias="per_head"),
    "gqa": dict(shape=(2, 8, 2, 45, 60, 32, 32), mask="bool_padding", bias="per_head"),
    "gqa_causal": dict(shape=(1, 6, 3, 70, 70, 64, 64), causal=True),
    "ev_ne_e": dict(shape=(2, 2, 2, 30, 50, 40, 72), bias="full"),
    "head_dim_100_odd": dict(shape=(1, 2, 2, 19, 23, 100, 33)),
    "head_dim_256": dict(shape=(1, 2, 2, 70, 80, 256, 256), mask="bool_2d"),
    "head_dim_256_ev_200": dict(shape=(1, 2, 1, 40, 50, 256, 200), causal=True),
    "strided_views": dict(shape=(2, 3, 3, 26, 31, 16, 16), strided=True, mask="bool_expanded", bias="expanded"),
    "fully_masked_rows": dict(shape=(2, 2, 2, 12, 20, 8, 8), mask="bool_empty_rows", bias="per_head"),
    "empty_L": dict(shape=(2, 2, 2, 0, 20, 8, 8), bias="full"),
    "empty_S": dict(shape=(2, 2, 2, 12, 0, 8, 8), bias="full"),
}


def make_inputs(case, dtype, device, seed=0):
    B, Hq, Hkv, L, S, E, Ev = case["shape"]
    gen = torch.Generator().manual_seed(seed)
    if case.get("strided"):
        # (B, L, H, E) storage read as (B, H, L, E): non-contiguous rows for q, k and v.
        q = randn(gen, B, L, Hq, E, dtype=dtype).to(device).transpose(1, 2)
        k = randn(gen, B, S, Hkv, E, dtype=dtype).to(device).transpose(1, 2)
        v = randn(gen, B, S, Hkv, Ev, dtype=dtype).to(device).transpose(1, 2)
    else:
        q = randn(gen, B, Hq, L, E, dtype=dtype).to(device)
        k = randn(gen, B, Hkv, S, E, dtype=dtype).to(device)
        v = randn(gen, B, Hkv, S, Ev, dtype=dtype).to(device)
    mask = {
        None: lambda: None,
        "bool_2d": lambda: bool_mask(gen, L, S),
        "bool_padding": lambda: bool_mask(gen, B, 1, 1, S),
        "bool_heads": lambda: bool_mask(gen, Hq, L, S),
        "bool_expanded": lambda: bool_mask(gen, 1, S).to(device).expand(B, Hq, L, S),
        "bool_empty_rows": lambda: bool_mask(gen, B, Hq, L, S).index_fill(2, torch.tensor([0, 5, L - 1]), False),
        "float_full": lambda: randn(gen, B, Hq, L, S, dtype=dtype),
        "float32_row": lambda: randn(gen, 1, S),
    }[case.get("mask")]()
    bias = {
        None: lambda: None,
        "full": lambda: randn(gen, B, Hq, L, S, dtype=dtype),
        "per_head": lambda: randn(gen, Hq, L, S, dtype=dtype),
        "expanded": lambda: randn(gen, Hq, 1, 1, dtype=dtype).to(device).expand(B, Hq, L, S),
    }[case.get("bias")]()
    mask = mask.to(device) if mask is not None else None
    bias = bias.to(device) if bias is not None else None
    grad_out = randn(gen, B, Hq, L, Ev, dtype=dtype).to(device)
    return dict(query=q, key=k, value=v, attn_mask=mask, attn_bias=bias, is_causal=case.get("causal", False),
                enable_gqa=Hq != Hkv), grad_out


def tolerance(dtype, expected):
    # Two approximations of the same value, each within the reference tolerance; gradients summed over
    # many rows are compared relative to their largest entry.
    atol, rtol = TOLERANCES[dtype]
    finite = expected[torch.isfinite(expected)]
    magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return dict(atol=4 * atol * magnitude, rtol=4 * rtol)


def run(inputs, grad_out, with_grads=True):
    """Forward (out, lse), the weights and, if asked, the gradients of q, k, v and the floating masks."""
    leaves = {}
    args = dict(inputs)
    if with_grads:
        for name in ("query", "key", "value", "attn_mask", "attn_bias"):
            t = args[name]
            if t is not None and t.is_floating_point():
                t = t.detach().requires_grad_(True)
                args[name] = t
                leaves[name] = t
    out, lse = mha_ext.scaled_dot_product_attention(**args, return_lse=True)
    results = {"out": out.detach(), "lse": lse.detach()}
    weights_args = {k: v for k, v in inputs.items() if k != "value"}
    results["weights"] = mha_ext.attention_weights(**weights_args)
    if with_grads:
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
        for name, grad in zip(leaves, grads):
            results["grad_" + name] = grad
    return results


def assert_results_close(cuda, cpu, dtype):
    assert cuda.keys() == cpu.keys()
    for name in cpu:
        expected, actual = cpu[name], cuda[name]
        assert actual.device.type == "cuda", name
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        torch.testing.assert_close(actual.cpu(), expected, **tolerance(dtype, expected), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu(case, dtype):
    cpu = run(*make_inputs(CASES[case], dtype, "cpu"))
    cuda = run(*make_inputs(CASES[case], dtype, "cuda"))
    assert_results_close(cuda, cpu, dtype)


# fp16/bf16 with E, Ev <= 128 run on the tensor-core forward on sm80+ (docs/cuda.md): head dims that are and
# are not multiples of its 16-wide tiles, odd L and S spanning several query and key tiles, every mask shape,
# causal, GQA (Hq = 4, Hkv = 2), against the fp64 reference.
TENSOR_CORE_DTYPES = [torch.float16, torch.bfloat16]
TENSOR_CORE_HEAD_DIMS = [(16, 16), (40, 40), (64, 64), (72, 72), (128, 128), (40, 72), (72, 16), (16, 128), (128, 40)]
TENSOR_CORE_VARIANTS = {
    "plain": dict(),
    "bool_2d": dict(mask="bool_2d"),
    "bool_padding_bias_full": dict(mask="bool_padding", bias="full"),
    "bool_heads": dict(mask="bool_heads"),
    "strided_expanded": dict(strided=True, mask="bool_expanded", bias="expanded"),
    "fully_masked_rows": dict(mask="bool_empty_rows", bias="per_head"),
    "float_mask_full": dict(mask="float_full"),
    "float32_mask_row_bias": dict(mask="float32_row", bias="per_head"),
    "causal_L_lt_S": dict(causal=True),
    "causal_L_gt_S": dict(causal=True, mask="bool_2d", bias="per_head", L=131, S=67),
    "single_query": dict(L=1),
}


def tensor_core_case(variant, E, Ev):
    case = dict(TENSOR_CORE_VARIANTS[variant])
    L, S = case.pop("L", 67), case.pop("S", 93)
    return dict(case, shape=(2, 4, 2, L, S, E, Ev))


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("variant", list(TENSOR_CORE_VARIANTS))
def test_tensor_core_forward_matches_reference(variant, E, Ev, dtype):
    case = tensor_core_case(variant, E, Ev)
    inputs, _ = make_inputs(case, dtype, "cuda")
    out, lse = mha_ext.scaled_dot_product_attention(**inputs, return_lse=True)
    reference_inputs, _ = make_inputs(case, dtype, "cpu")
    del reference_inputs["enable_gqa"]  # the reference repeats K/V whenever the head counts differ
    expected_out, expected_lse = reference_attention(**reference_inputs, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), expected_out, **tolerance(dtype, expected_out))
    torch.testing.assert_close(lse.double().cpu(), expected_lse, **tolerance(dtype, expected_lse))


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("E, Ev", [(16, 40), (72, 64), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_forward_dropout_equals_reference_with_helper_mask(dtype, E, Ev, causal):
    gen = torch.Generator().manual_seed(5)
    L, S, p = 67, 93, 0.3
    q = randn(gen, 2, 4, L, E, dtype=dtype).cuda()
    k = randn(gen, 2, 2, S, E, dtype=dtype).cuda()
    v = randn(gen, 2, 2, S, Ev, dtype=dtype).cuda()
    pad = torch.rand(2, 1, 1, S, generator=gen) > 0.2
    state = torch.Generator().manual_seed(9)
    keep = mha_ext.dropout_mask(q, k, p, generator=state, enable_gqa=True).cpu()
    state.manual_seed(9)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=pad.cuda(), dropout_p=p, is_causal=causal,
                                               enable_gqa=True, generator=state)

    rq, rk, rv = (t.double().cpu() for t in (q, k, v))
    rk, rv = rk.repeat_interleave(2, 1), rv.repeat_interleave(2, 1)
    scores = (rq @ rk.transpose(-1, -2) / E**0.5).masked_fill(~pad, float("-inf"))
    if causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = (probs * keep / (1 - p)) @ rv
    torch.testing.assert_close(out.double().cpu(), expected, **tolerance(dtype, expected))


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
    B, Hq, Hkv, L, S, E, Ev = CASES[case]["shape"]
    small = dict(CASES[case], shape=(1, Hq, Hkv, min(L, 9), min(S, 11), min(E, 6), min(Ev, 5)))
    inputs, _ = make_inputs(small, torch.float64, "cuda")
    names = [n for n in ("query", "key", "value", "attn_bias") if inputs[n] is not None]
    fixed = {n: v for n, v in inputs.items() if n not in names}

    def fn(*tensors):
        return mha_ext.scaled_dot_product_attention(**fixed, **dict(zip(names, tensors)))

    tensors = [inputs[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, tensors, atol=1e-7, rtol=1e-5)


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
        torch.ops.mha_ext.attention_forward(q, k, v, cpu_mask, None, False, 1.0)
    with pytest.raises(ValueError, match="attn_bias must be on the query's device"):
        torch.ops.mha_ext.attention_forward(q, k, v, None, inputs["attn_bias"].cpu(), False, 1.0)


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
