"""Inputs and comparisons shared by the CUDA tests (test_cuda.py, on a GPU) and the emulated-CUDA tests
(test_cuda_emulated.py, the same kernels run on the CPU by tests/cuda_emulator)."""

from __future__ import annotations

import torch

import mha_ext
from .reference import TOLERANCES, reference_attention

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
    # Bottom-right causality: the last query row attends every key; with L > S the first rows attend none.
    "causal_lower_right_L_lt_S": dict(shape=(2, 2, 2, 37, 200, 16, 16), causal="lower_right", mask="bool_2d"),
    "causal_lower_right_L_gt_S": dict(shape=(2, 2, 2, 90, 37, 16, 16), causal="lower_right", bias="per_head"),
    "causal_lower_right_decode": dict(shape=(2, 4, 2, 3, 150, 32, 32), causal="lower_right", mask="bool_padding"),
    # torch's broadcasting: key/value with batch 1 and 1 head against the query's; one query head against 3.
    "broadcast_key_value": dict(shape=(2, 4, 1, 21, 33, 16, 16), kv_batch=1, bias="per_head"),
    "broadcast_query_head": dict(shape=(2, 1, 3, 21, 33, 16, 24), mask="bool_padding", causal=True),
    # Empty head dims: softmax(masks) @ V, and an empty output with its LSE.
    "empty_query_key_dim": dict(shape=(2, 2, 2, 12, 20, 0, 8), mask="bool_2d", bias="full"),
    "empty_value_dim": dict(shape=(2, 2, 2, 12, 20, 8, 0), bias="full"),
}


def make_inputs(case, dtype, device, seed=0):
    B, Hq, Hkv, L, S, E, Ev = case["shape"]
    Bkv, H = case.get("kv_batch", B), max(Hq, Hkv)  # H: the output's heads
    gen = torch.Generator().manual_seed(seed)
    if case.get("strided"):
        # (B, L, H, E) storage read as (B, H, L, E): non-contiguous rows for q, k and v.
        q = randn(gen, B, L, Hq, E, dtype=dtype).to(device).transpose(1, 2)
        k = randn(gen, Bkv, S, Hkv, E, dtype=dtype).to(device).transpose(1, 2)
        v = randn(gen, Bkv, S, Hkv, Ev, dtype=dtype).to(device).transpose(1, 2)
    else:
        q = randn(gen, B, Hq, L, E, dtype=dtype).to(device)
        k = randn(gen, Bkv, Hkv, S, E, dtype=dtype).to(device)
        v = randn(gen, Bkv, Hkv, S, Ev, dtype=dtype).to(device)
    mask = {
        None: lambda: None,
        "bool_2d": lambda: bool_mask(gen, L, S),
        "bool_padding": lambda: bool_mask(gen, B, 1, 1, S),
        "bool_heads": lambda: bool_mask(gen, H, L, S),
        "bool_expanded": lambda: bool_mask(gen, 1, S).to(device).expand(B, H, L, S),
        "bool_empty_rows": lambda: bool_mask(gen, B, H, L, S).index_fill(2, torch.tensor([0, 5, L - 1]), False),
        "float_full": lambda: randn(gen, B, H, L, S, dtype=dtype),
        "float32_row": lambda: randn(gen, 1, S),
    }[case.get("mask")]()
    bias = {
        None: lambda: None,
        "full": lambda: randn(gen, B, H, L, S, dtype=dtype),
        "per_head": lambda: randn(gen, H, L, S, dtype=dtype),
        "expanded": lambda: randn(gen, H, 1, 1, dtype=dtype).to(device).expand(B, H, L, S),
    }[case.get("bias")]()
    mask = mask.to(device) if mask is not None else None
    bias = bias.to(device) if bias is not None else None
    grad_out = randn(gen, B, H, L, Ev, dtype=dtype).to(device)
    return dict(query=q, key=k, value=v, attn_mask=mask, attn_bias=bias, is_causal=case.get("causal", False),
                enable_gqa=Hq != Hkv and 1 not in (Hq, Hkv)), grad_out


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


def assert_results_close(actual_results, cpu, dtype, device_type="cuda"):
    assert actual_results.keys() == cpu.keys()
    for name in cpu:
        expected, actual = cpu[name], actual_results[name]
        assert actual.device.type == device_type, name
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        torch.testing.assert_close(actual.cpu(), expected, **tolerance(dtype, expected), msg=lambda m: f"{name}: {m}")


# fp16/bf16 run on the tensor-core kernels on sm80+ (docs/cuda.md; head dims above 128 where the part has
# 163 KiB of shared memory per block): head dims in all three buckets, in and out of multiples of the 16-wide
# tiles, odd L and S spanning several query and key tiles, every mask shape, causal, GQA (Hq = 4, Hkv = 2).
TENSOR_CORE_DTYPES = [torch.float16, torch.bfloat16]
TENSOR_CORE_HEAD_DIMS = [(16, 16), (40, 40), (64, 64), (72, 72), (128, 128), (40, 72), (72, 16), (16, 128), (128, 40),
                         (256, 256), (200, 136), (24, 256)]
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
    "causal_lower_right_L_lt_S": dict(causal="lower_right", mask="bool_padding"),
    "causal_lower_right_L_gt_S": dict(causal="lower_right", L=131, S=67),
    "single_query": dict(L=1),
}


def tensor_core_case(variant, E, Ev):
    case = dict(TENSOR_CORE_VARIANTS[variant])
    L, S = case.pop("L", 67), case.pop("S", 93)
    return dict(case, shape=(2, 4, 2, L, S, E, Ev))


def check_forward_against_reference(case, dtype, device):
    """The forward's output and LSE on `device` against the fp64 reference."""
    inputs, _ = make_inputs(case, dtype, device)
    out, lse = mha_ext.scaled_dot_product_attention(**inputs, return_lse=True)
    reference_inputs, _ = make_inputs(case, dtype, "cpu")
    del reference_inputs["enable_gqa"]  # the reference repeats K/V whenever the head counts differ
    expected_out, expected_lse = reference_attention(**reference_inputs, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), expected_out, **tolerance(dtype, expected_out))
    torch.testing.assert_close(lse.double().cpu(), expected_lse, **tolerance(dtype, expected_lse))


def check_dropout_forward_against_helper_mask(dtype, E, Ev, causal, device):
    """A padded GQA forward with dropout against the fp64 reference with the decisions of mha_ext.dropout_mask."""
    gen = torch.Generator().manual_seed(5)
    L, S, p = 67, 93, 0.3
    q = randn(gen, 2, 4, L, E, dtype=dtype).to(device)
    k = randn(gen, 2, 2, S, E, dtype=dtype).to(device)
    v = randn(gen, 2, 2, S, Ev, dtype=dtype).to(device)
    pad = torch.rand(2, 1, 1, S, generator=gen) > 0.2
    state = torch.Generator().manual_seed(9)
    keep = mha_ext.dropout_mask(q, k, p, generator=state, enable_gqa=True).cpu()
    state.manual_seed(9)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=pad.to(device), dropout_p=p, is_causal=causal,
                                               enable_gqa=True, generator=state)

    rq, rk, rv = (t.double().cpu() for t in (q, k, v))
    rk, rv = rk.repeat_interleave(2, 1), rv.repeat_interleave(2, 1)
    scores = (rq @ rk.transpose(-1, -2) / E**0.5).masked_fill(~pad, float("-inf"))
    if causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = (probs * keep / (1 - p)) @ rv
    torch.testing.assert_close(out.double().cpu(), expected, **tolerance(dtype, expected))


def check_gradcheck_float64(case, device, fast_mode=False):
    """gradcheck of q, k, v and the bias on `device`, in float64, on a small version of the case."""
    B, Hq, Hkv, L, S, E, Ev = case["shape"]
    small = dict(case, shape=(1, Hq, Hkv, min(L, 9), min(S, 11), min(E, 6), min(Ev, 5)))
    inputs, _ = make_inputs(small, torch.float64, device)
    names = [n for n in ("query", "key", "value", "attn_bias") if inputs[n] is not None]
    fixed = {n: v for n, v in inputs.items() if n not in names}

    def fn(*tensors):
        return mha_ext.scaled_dot_product_attention(**fixed, **dict(zip(names, tensors)))

    tensors = [inputs[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, tensors, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)
