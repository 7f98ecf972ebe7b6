"""Gradients: gradcheck in float64, and every dtype's gradients against the fp64 reference's autograd."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from conftest import DEVICES, TOLERANCES, at_thread_counts, reference_attention


def leaf(t):
    return t.detach().clone().requires_grad_(True)


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


def test_backward_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 2, 257, 16, generator=gen) for _ in range(3))
    def grads():
        inputs = [leaf(t) for t in (q, k, v)]
        mha_ext.scaled_dot_product_attention(*inputs, is_causal=True).sum().backward()
        return [t.grad for t in inputs]

    results = at_thread_counts(grads)
    for a, b in zip(*results):
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


def test_shared_bias_gradient_does_not_depend_on_thread_count():
    # A (H, L, S) bias shared by a batch of 3: its gradient adds up the batch inside one work item.
    gen = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(3, 2, 130, 16, generator=gen) for _ in range(3))
    bias = torch.randn(2, 130, 130, generator=gen)
    def grads():
        inputs = [leaf(t) for t in (q, k, v, bias)]
        mha_ext.scaled_dot_product_attention(*inputs[:3], attn_bias=inputs[3]).square().sum().backward()
        return [t.grad for t in inputs]

    results = at_thread_counts(grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref_inputs = [leaf(t.double()) for t in (q, k, v, bias)]
    reference_attention(*ref_inputs[:3], attn_bias=ref_inputs[3]).square().sum().backward()
    torch.testing.assert_close(results[0][3].double(), ref_inputs[3].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["odd_tiles", "unaligned_views", "odd_value_dim"])
def test_bf16_tile_product_gradients_match_reference(case):
    """bf16 gradients from the VNNI tile products (where the CPU has them) and from tiles widened to float32
    (torch.backends.mkldnn off) both match the fp64 reference: odd query and key tile sizes (the padded pair
    rows and columns), rows starting at odd bf16 offsets, and an odd value dim (which always widens)."""
    gen = torch.Generator().manual_seed(len(case))
    randn = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)
    if case == "odd_tiles":
        q, k, v = randn(2, 4, 131, 64), randn(2, 2, 197, 64), randn(2, 2, 197, 96)
    elif case == "unaligned_views":
        wide = randn(2, 37, 3, 3, 33)  # a fused projection with one pad column: rows start at odd offsets
        q, k, v = (wide[:, :, i, :, 1:].transpose(1, 2) for i in range(3))
    else:
        q, k, v = randn(1, 2, 40, 16), randn(1, 2, 50, 16), randn(1, 2, 50, 15)
    mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=gen) > 0.3
    grad_out = randn(*q.shape[:-1], v.shape[-1])
    ref_inputs = [leaf(t.double()) for t in (q, k, v)]
    reference_attention(*ref_inputs, attn_mask=mask, is_causal=True).backward(grad_out.double())
    atol, rtol = TOLERANCES[torch.bfloat16]
    for mkldnn in (True, False):
        inputs = [leaf(t) for t in (q, k, v)]
        previous, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, mkldnn
        try:
            out = mha_ext.scaled_dot_product_attention(*inputs, attn_mask=mask, is_causal=True, enable_gqa=True)
            out.backward(grad_out)
        finally:
            torch.backends.mkldnn.enabled = previous
        for name, ours, ref in zip("qkv", inputs, ref_inputs):
            bound = atol * 10 + rtol * ref.grad.abs().max().item()
            torch.testing.assert_close(ours.grad.double(), ref.grad, atol=bound, rtol=rtol * 10,
                                       msg=f"{name}, mkldnn={mkldnn}")


@pytest.mark.parametrize("padded_batch", [0, 1])
def test_shared_bias_gradient_covers_skipped_tiles(padded_batch):
    """A bias gradient slab shared by the batch (the CPU backward adds the batch-heads into one slab): tiles
    skipped by causality (rows above the diagonal) and by a padding mask (whole key tiles of one batch) come
    out exactly 0 and the rest matches the reference, whichever batch is padded."""
    gen = torch.Generator().manual_seed(43 + padded_batch)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (150, 300, 300))
    bias = torch.randn(3, 150, 300, generator=gen)
    keep = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    keep[padded_batch, ..., 100:] = False  # key tiles 1 and 2 of that batch attend nothing
    grad_out = torch.randn(2, 3, 150, 16, generator=gen)
    ours = leaf(bias)
    mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=keep, attn_bias=ours, is_causal=True).backward(grad_out)
    ref = leaf(bias.double())
    reference_attention(q.double(), k.double(), v.double(), attn_mask=keep, attn_bias=ref, is_causal=True).backward(
        grad_out.double())
    assert torch.isfinite(ours.grad).all()
    above_diagonal = ~torch.ones(150, 300, dtype=torch.bool).tril()
    assert (ours.grad[:, above_diagonal] == 0).all()
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_bias_gradient_of_64_mib_on_huge_pages():
    """A bias gradient of 64 MiB and more is allocated on transparent huge pages (csrc/cpu/huge_pages.cpp):
    with causality, everything above the diagonal is exactly 0 and the rest matches the reference, on a
    first and a second call."""
    gen = torch.Generator().manual_seed(47)
    q, k, v = (torch.randn(1, 4, 2048, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 2048, 2048, generator=gen)  # 64 MiB in float32
    grad_out = torch.randn(1, 4, 2048, 8, generator=gen)
    ref = leaf(bias.double())
    reference_attention(q.double(), k.double(), v.double(), attn_bias=ref, is_causal=True).backward(grad_out.double())
    above_diagonal = ~torch.ones(2048, 2048, dtype=torch.bool).tril()
    for _ in range(2):
        ours = leaf(bias)
        mha_ext.scaled_dot_product_attention(q, k, v, attn_bias=ours, is_causal=True).backward(grad_out)
        assert (ours.grad[..., above_diagonal] == 0).all()
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)
