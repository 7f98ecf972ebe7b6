"""Gradients: gradcheck in float64, and every dtype's gradients against the fp64 reference's autograd."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.reference import DEVICES, TOLERANCES, leaf, reference_attention


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "B,Hq,Hkv,L,S,E,Ev,causal",
    [(1, 2, 2, 5, 7, 4, 3, False), (2, 4, 2, 9, 6, 3, 5, True), (1, 3, 1, 1, 9, 6, 6, False), (1, 1, 1, 70, 66, 3, 2, True)],
)
def test_gradcheck_query_key_value(device, B, Hq, Hkv, L, S, E, Ev, causal):
    gen = torch.Generator().manual_seed(B + Hq + L + S)
    q = torch.randn(B, Hq, L, E, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(B, Hkv, S, E, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(B, Hkv, S, Ev, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = (torch.rand(B, 1, L, S, generator=gen) > 0.3).to(device)
    mask[0, 0, 0] = False  # a fully masked row: its gradient is exactly zero

    def fn(q, k, v):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_shape", [(7, 9), (3, 1, 9), (2, 1, 7, 1), (2, 3, 7, 9), (1, 9)])
def test_gradcheck_bias_with_bool_mask(device, bias_shape):
    gen = torch.Generator().manual_seed(len(bias_shape))
    q = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(2, 3, 9, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = (torch.rand(2, 1, 1, 9, generator=gen) > 0.3).to(device)

    def fn(q, k, v, bias):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float_attn_mask_and_lse(device):
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(2, 2, 8, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(2, 2, 8, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.randn(6, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    def fn(q, k, v, mask):
        # Both outputs take part, so the LSE's own gradient is checked too.
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,S,Hq,Hkv", [(33, 257, 4, 2), (257, 33, 2, 2), (7, 130, 3, 1)])
def test_gradients_match_reference(device, dtype, L, S, Hq, Hkv):
    gen = torch.Generator().manual_seed(L * S + Hq)
    shape = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    q, k, v = shape(2, Hq, L, 32), shape(2, Hkv, S, 32), shape(2, Hkv, S, 16)
    bias = shape(Hq, 1, S)
    mask = (torch.rand(2, 1, L, S, generator=gen) > 0.3).to(device)
    mask[1, 0, 2] = False
    grad_out = shape(2, Hq, L, 16)

    inputs = [leaf(t) for t in (q, k, v, bias)]
    out = mha_ext.scaled_dot_product_attention(*inputs[:3], attn_mask=mask, attn_bias=inputs[3], is_causal=True,
                                               enable_gqa=True)
    out.backward(grad_out)
    ref_inputs = [leaf(t.double()) for t in (q, k, v, bias)]
    reference_attention(*ref_inputs[:3], attn_mask=mask, attn_bias=ref_inputs[3], is_causal=True).backward(
        grad_out.double())
    atol, rtol = TOLERANCES[dtype]
    for name, ours, ref in zip("qkvb", inputs, ref_inputs):
        assert ours.grad.dtype == dtype, name
        assert torch.isfinite(ours.grad).all(), name
        # Gradients sum over up to S (or L * heads) terms: scale the tolerance by the sum's magnitude.
        bound = atol * 10 + rtol * ref.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=bound, rtol=rtol * 10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_have_zero_gradients(device):
    q = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, device=device, requires_grad=True)
    mask = torch.ones(5, 6, dtype=torch.bool, device=device)
    mask[2] = False
    mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    assert (q.grad[:, :, 2] == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_keys_nobody_attends_get_zero_gradients(device):
    q = torch.randn(1, 1, 4, 8, device=device, requires_grad=True)
    k = torch.randn(1, 1, 200, 8, device=device, requires_grad=True)
    v = torch.randn(1, 1, 200, 8, device=device, requires_grad=True)
    mask = torch.zeros(1, 200, dtype=torch.bool, device=device)
    mask[:, :3] = True  # key tiles past the first are fully masked and skipped
    mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    assert (k.grad[:, :, 3:] == 0).all() and (v.grad[:, :, 3:] == 0).all()
    assert (v.grad[:, :, :3] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_deterministic(device):
    gen = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=gen).to(device) for _ in range(3))
    bias = torch.randn(4, 300, 300, generator=gen).to(device)

    def grads():
        inputs = [leaf(t) for t in (q, k, v, bias)]
        mha_ext.scaled_dot_product_attention(*inputs[:3], attn_bias=inputs[3], is_causal=True).square().sum().backward()
        return [t.grad for t in inputs]

    first = grads()
    for _ in range(2):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_shape,bias_shape", [((6, 8), (2, 1, 6, 1)), ((1, 4, 1, 8), (6, 8)), ((2, 4, 6, 8), (8,))])
def test_gradcheck_mask_and_bias_broadcast_differently(device, mask_shape, bias_shape):
    # Both need a gradient: the score gradient is kept per slab of the dims either of them does not
    # broadcast over, then summed down to each shape (GQA: 4 query heads over 2 kv heads).
    gen = torch.Generator().manual_seed(len(mask_shape) * 10 + len(bias_shape))
    q = torch.randn(2, 4, 6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(2, 2, 8, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(2, 2, 8, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.randn(mask_shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    def fn(q, k, v, mask, bias):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask, bias))


