"""Causality in both alignments: top-left (``is_causal=True`` / ``"upper_left"``, torch's) and bottom-right
(``"lower_right"``: query i attends keys j <= i + S - L, as torch's ``causal_lower_right`` and FlashAttention's
causal), forward and backward, against the fp64 reference on shapes that cross the CPU kernels' query and key
tiles (forward 64 x 512 with query-tile groups, backward 64 x 128), so the tiles causality skips and trims are
exercised at every edge."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import CausalVariant, causal_lower_right, causal_upper_left

import mha_ext
from helpers.reference import DEVICES, assert_close_to_reference, causal_allowed, reference_attention

# torch warns that its own lower-right CausalBias gives NaN rows when L > S; mha_ext's (and its fused kernels') are 0.
pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# L < S (KV cache, chunked prefill), L > S (leading rows see nothing), L == S, decode, across tile edges.
SHAPES = [(1, 700), (3, 130), (70, 1100), (300, 650), (129, 129), (200, 70), (600, 520)]


def inputs(L, S, dtype, device, E=16, Ev=24, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, L, E, generator=gen).to(dtype)
    k = torch.randn(2, 2, S, E, generator=gen).to(dtype)
    v = torch.randn(2, 2, S, Ev, generator=gen).to(dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
def test_forward_and_lse_match_reference(device, dtype, L, S, alignment):
    q, k, v = inputs(L, S, dtype, device, seed=L * 1000 + S)
    out, lse = mha_ext.scaled_dot_product_attention(q, k, v, is_causal=alignment, return_lse=True)
    expected, expected_lse = reference_attention(q, k, v, is_causal=alignment, return_lse=True)
    assert_close_to_reference(out, expected, dtype)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)  # rows that see no key: LSE -inf, output 0
    assert_close_to_reference(lse.cpu()[finite], expected_lse[finite], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,S", [(3, 130), (70, 300), (200, 70), (129, 129)])
def test_backward_matches_reference_with_masks_and_bias(device, dtype, L, S):
    # With a bool padding mask and a bias that needs its gradient: every skipped or trimmed tile must give
    # the same gradients as the reference's explicit mask.
    q, k, v = inputs(L, S, dtype, device, seed=S, requires_grad=True)
    gen = torch.Generator().manual_seed(L)
    mask = (torch.rand(2, 1, 1, S, generator=gen) > 0.2).to(device)
    bias = torch.randn(2, L, S, generator=gen).to(dtype).to(device).requires_grad_()
    grad_out = torch.randn(2, 2, L, v.shape[-1], generator=gen).to(dtype).to(device)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal="lower_right")
    grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, bias)]
    expected = reference_attention(ref[0], ref[1], ref[2], attn_mask=mask.cpu(), attn_bias=ref[3], is_causal="lower_right")
    expected_grads = torch.autograd.grad(expected, ref, grad_out.double().cpu())
    assert_close_to_reference(out, expected, dtype)
    for grad, expected_grad in zip(grads, expected_grads):
        scale = max(1.0, expected_grad.abs().max().item())  # sums over many rows, compared at their size
        assert_close_to_reference(grad, expected_grad, dtype, scale=4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_lower_right(device):
    q, k, v = inputs(5, 9, torch.float64, device, E=4, Ev=3, requires_grad=True)
    bias = torch.randn(5, 9, dtype=torch.float64, device=device, requires_grad=True)
    for L in (5, 3):  # L < S, and L > S once the keys are cut to 3 below
        keys = (k, v) if L == 5 else (k[..., :3, :], v[..., :3, :])
        assert torch.autograd.gradcheck(
            lambda q, k, v, b: mha_ext.scaled_dot_product_attention(q, k, v, attn_bias=b[:, :k.shape[-2]],
                                                                     is_causal="lower_right"),
            (q, *keys, bias), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_lower_right_equals_the_explicit_mask_and_the_weights_agree(device):
    L, S = 37, 90
    q, k, v = inputs(L, S, torch.float32, device)
    allowed = causal_allowed(L, S, "lower_right", device)
    torch.testing.assert_close(mha_ext.scaled_dot_product_attention(q, k, v, is_causal="lower_right"),
                               mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    weights = mha_ext.attention_weights(q, k, is_causal="lower_right")
    assert (weights[..., ~allowed] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, L, device=device))


def assert_same_as_torch(attend, q, k, v, mask):
    """attend(q, k, v, mask) and torch's SDPA with attn_mask=mask: the same outputs and input gradients."""
    out = attend(q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(torch.autograd.grad(out.sum(), (q, k, v)),
                                   torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(grad, expected_grad)
    return out


def attend_with_mask(q, k, v, mask):
    return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (6, 6)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_runs_as_causal_attention_like_torch(L, S, variant):
    # torch's CausalBias is a tensor subclass whose storage holds nothing: read as a mask it gave garbage.
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    q, k, v = inputs(L, S, torch.float64, "cpu", requires_grad=True)
    out = assert_same_as_torch(attend_with_mask, q, k, v, make(L, S))
    assert_close_to_reference(out, reference_attention(q, k, v, is_causal=variant), torch.float64)


@pytest.mark.parametrize("L,S", [(5, 9), (9, 5)])
def test_causal_bias_with_is_causal_keeps_what_both_allow(L, S):
    # torch refuses the combination; mha_ext attends the pairs both conditions allow.
    q, k, v = inputs(L, S, torch.float64, "cpu")
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S), is_causal=True)
    both = causal_allowed(L, S, "upper_left") & causal_allowed(L, S, "lower_right")
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=both), torch.float64)


def test_causal_variant_values_are_accepted():
    q, k, v = inputs(4, 7, torch.float64, "cpu")
    for variant, alignment in [(CausalVariant.UPPER_LEFT, "upper_left"), (CausalVariant.LOWER_RIGHT, "lower_right")]:
        torch.testing.assert_close(mha_ext.scaled_dot_product_attention(q, k, v, is_causal=variant),
                                   mha_ext.scaled_dot_product_attention(q, k, v, is_causal=alignment))


@pytest.mark.slow
def test_causal_bias_and_lower_right_under_torch_compile():
    L, S = 5, 9
    q, k, v = inputs(L, S, torch.float32, "cpu", requires_grad=True)

    compiled = torch.compile(attend_with_mask, fullgraph=True, backend="aot_eager")
    expected = assert_same_as_torch(compiled, q, k, v, causal_lower_right(L, S))
    lower_right = torch.compile(lambda q, k, v: mha_ext.scaled_dot_product_attention(q, k, v, is_causal="lower_right"),
                                fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(lower_right(q, k, v), expected)


def test_mask_helper_builds_both_alignments():
    torch.testing.assert_close(mha_ext.masks.causal(4, 6), causal_allowed(4, 6, "upper_left"))
    torch.testing.assert_close(mha_ext.masks.causal(4, 6, alignment="lower_right"), causal_allowed(4, 6, "lower_right"))
    torch.testing.assert_close(mha_ext.masks.causal(6, 4, alignment="lower_right"),
                               causal_lower_right(6, 4)._materialize().bool())
    with pytest.raises(ValueError, match="alignment must be 'upper_left' or 'lower_right', got 'top'"):
        mha_ext.masks.causal(4, 6, alignment="top")


@pytest.mark.slow
def test_lower_right_skips_work_like_top_left():
    # Tile skipping: with L = S the two alignments are the same mask and must cost the same; against a full
    # (unmasked) run both skip about half the key tiles. Timed as a ratio in one process, generously bounded.
    import time

    q, k, v = inputs(1024, 1024, torch.float32, "cpu", E=64, Ev=64)

    def best(**kwargs):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mha_ext.scaled_dot_product_attention(q, k, v, **kwargs)
            times.append(time.perf_counter() - start)
        return min(times)

    full, lower_right = best(), best(is_causal="lower_right")
    assert lower_right < 0.8 * full, (lower_right, full)
