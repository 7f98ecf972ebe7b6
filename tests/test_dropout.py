"""Attention dropout inside the fused kernels: the RNG, its statistics, exactness against an explicit
reference built from the helper's mask, reproducibility and edge values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mha_ext
from helpers.reference import DEVICES, at_thread_counts

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox_keep_mask(n_heads, L, S, p, seed, offset):
    """Philox4x32-10 written from its definition (numpy), and the documented keying: counter
    (column // 4, row, batch-head, offset), key = seed; word column % 4 kept when >= p * 2^32."""
    n, row, col = np.meshgrid(np.arange(n_heads, dtype=np.uint64), np.arange(L, dtype=np.uint64),
                              np.arange(S, dtype=np.uint64), indexing="ij")
    x = [col >> np.uint64(2), row, n & np.uint64(MASK32), (np.uint64(offset & MASK32) ^ (n >> np.uint64(32)))]
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        p0 = np.uint64(M0) * x[0]
        p1 = np.uint64(M1) * x[2]
        x = [((p1 >> np.uint64(32)) ^ x[1] ^ np.uint64(k0)) & np.uint64(MASK32), p1 & np.uint64(MASK32),
             ((p0 >> np.uint64(32)) ^ x[3] ^ np.uint64(k1)) & np.uint64(MASK32), p0 & np.uint64(MASK32)]
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    words = np.stack(x, axis=-1)  # (..., 4)
    word = np.take_along_axis(words, (col & np.uint64(3)).astype(np.int64)[..., None], axis=-1)[..., 0]
    return torch.from_numpy(word >= np.uint64(int(p * 2**32)))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_philox_keyed_by_seed_offset_head_row_column(device):
    q = torch.randn(2, 3, 37, 8, device=device)
    k = torch.randn(2, 3, 70, 8, device=device)
    rng_state = torch.tensor([0x123456789ABCDEF, 77], dtype=torch.int64)
    keep = mha_ext.dropout_mask(q, k, 0.3, rng_state=rng_state)
    expected = philox_keep_mask(6, 37, 70, 0.3, 0x123456789ABCDEF, 77).view(2, 3, 37, 70)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 37, 70)
    assert torch.equal(keep.cpu(), expected)


def _slice_rng_state(seed, offset, rows, columns, heads, total_heads):
    return torch.tensor([seed, offset, rows.start, columns.start, heads.start, total_heads])


@pytest.mark.parametrize("device", DEVICES)
def test_slice_coordinates_reproduce_the_whole_calls_decisions(device):
    # Sequence-parallel attention runs slices of one call: rng_state's offsets make a slice (rows, columns,
    # heads at offsets, unaligned to Philox's four-column blocks) decide as the whole call does.
    B, H, L, S, E, p = 2, 6, 29, 43, 8, 0.4
    q = torch.randn(B, H, L, E, dtype=torch.float64, device=device)
    k = torch.randn(B, H, S, E, dtype=torch.float64, device=device)
    v = torch.randn(B, H, S, 5, dtype=torch.float64, device=device)
    whole = torch.tensor([123, 45])
    keep = mha_ext.dropout_mask(q, k, p, rng_state=whole)
    rows, columns, heads = slice(7, 20), slice(13, 38), slice(2, 5)
    state = _slice_rng_state(123, 45, rows, columns, heads, H)
    part = mha_ext.dropout_mask(q[:, heads, rows], k[:, heads, columns], p, rng_state=state)
    torch.testing.assert_close(part, keep[:, heads, rows, columns], rtol=0, atol=0)
    # The kernels' decisions, forward and backward, against a reference that uses the sliced mask.
    qs, ks, vs = (t[:, heads].detach().requires_grad_() for t in (q[:, :, rows], k[:, :, columns], v[:, :, columns]))
    scale, state = E ** -0.5, state.to(device)
    out, lse = torch.ops.mha_ext.attention_forward(qs, ks, vs, None, None, "none", scale, p, state)
    expected = (torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1) * part / (1 - p)) @ vs
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    grads = torch.ops.mha_ext.attention_backward(grad_out, out, lse, None, False, False, qs, ks, vs, None, None,
                                                 "none", scale, p, state)[:3]
    for got, want in zip(grads, torch.autograd.grad(expected, (qs, ks, vs), grad_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    q = torch.randn(4, 8, 128, 4)
    keep = mha_ext.dropout_mask(q, q, p, generator=torch.Generator().manual_seed(1))
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # No structure across rows and columns: the keep rate of each column block and row is plausible too.
    per_column = keep.double().mean(dim=(0, 1, 2))
    assert (per_column - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / (n / 128))


@pytest.mark.slow
def test_mean_over_draws_approaches_no_dropout_output():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = mha_ext.scaled_dot_product_attention(q, k, v)
    draws = 2000
    total = torch.zeros_like(exact)
    for _ in range(draws):
        total += mha_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.25, generator=gen)
    # Each draw's error has variance <= p/(1-p) * sum_j P_j^2 v_j^2 <= |v|max^2 / 3; the mean's is / draws.
    bound = 5 * v.abs().max().item() * math.sqrt(1 / 3 / draws)
    assert (total / draws - exact).abs().max().item() < bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,Hkv", [(False, 4), (True, 2)])
def test_output_and_gradients_equal_reference_with_helper_mask(device, dtype, causal, Hkv):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 33, 16, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(2, Hkv, 130, 16, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(2, Hkv, 130, 24, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(4, 33, 130, generator=gen).to(device=device, dtype=dtype)
    pad = (torch.rand(2, 1, 1, 130, generator=gen) > 0.2).to(device)
    p = 0.3
    state = torch.Generator().manual_seed(9)
    keep = mha_ext.dropout_mask(q, k, p, generator=state, enable_gqa=True)
    state.manual_seed(9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = mha_ext.scaled_dot_product_attention(*leaves[:3], attn_mask=pad, attn_bias=leaves[3], dropout_p=p,
                                               is_causal=causal, enable_gqa=True, generator=state)
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    out.backward(grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    rq, rk, rv, rb = ref_leaves
    group = 4 // Hkv
    rk_, rv_ = rk.repeat_interleave(group, 1), rv.repeat_interleave(group, 1)
    scores = rq @ rk_.transpose(-1, -2) / 4 + rb
    scores = scores.masked_fill(~pad, float("-inf"))
    if causal:
        scores = scores.masked_fill(~torch.ones(33, 130, dtype=torch.bool, device=device).tril(), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = (probs * keep / (1 - p)) @ rv_
    expected.backward(grad_out.double())

    tol = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    for name, ours, ref in zip("qkvb", leaves, ref_leaves):
        bound = tol * (1 + ref.grad.abs().max().item())
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=bound, rtol=tol * 10, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_dropout(device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
               for n in (6, 9, 9))
    bias = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    state = torch.Generator()

    def fn(q, k, v, bias):
        state.manual_seed(11)  # the same decisions on every evaluation
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_bias=bias, dropout_p=0.4, generator=state)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_seeded_runs_reproduce_and_consecutive_calls_differ():
    q, k, v = (torch.randn(2, 2, 40, 8, requires_grad=True) for _ in range(3))

    def run():
        out = mha_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return out, grads

    torch.manual_seed(123)
    first, first_grads = run()
    second, _ = run()
    torch.manual_seed(123)
    again, again_grads = run()
    assert torch.equal(first, again) and all(torch.equal(a, b) for a, b in zip(first_grads, again_grads))
    assert not torch.equal(first, second)


def test_result_does_not_depend_on_thread_count():
    q, k, v = (torch.randn(2, 3, 130, 16, requires_grad=True) for _ in range(3))
    def run():
        out = mha_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
        return out, torch.autograd.grad(out.sum(), (q, k, v))

    (out1, g1), (out2, g2) = at_thread_counts(run)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_zero_is_bit_identical_to_no_dropout(device):
    q, k, v = (torch.randn(2, 2, 33, 8, device=device, requires_grad=True) for _ in range(3))
    plain = mha_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    zero = mha_ext.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)
    assert torch.equal(plain, zero)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain.sum(), (q, k, v)),
                                                 torch.autograd.grad(zero.sum(), (q, k, v))))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_one_gives_zeros(device):
    q, k, v = (torch.randn(2, 2, 17, 8, device=device, requires_grad=True) for _ in range(3))
    out = mha_ext.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert (out == 0).all()
    for grad in torch.autograd.grad(out.sum(), (q, k, v)):
        assert (grad == 0).all()
    assert not mha_ext.dropout_mask(q, k, 1.0).any()


def test_bad_dropout_arguments_are_named():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        mha_ext.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"needs rng_state"):
        torch.ops.mha_ext.attention_forward(q, q, q, None, None, "none", 1.0, 0.5, None)
    with pytest.raises(ValueError, match=r"rng_state must be an int64 tensor \[seed, offset\] .* got Float of shape \(3,\)"):
        torch.ops.mha_ext.attention_forward(q, q, q, None, None, "none", 1.0, 0.5, torch.zeros(3))
    with pytest.raises(ValueError, match=r"head_offset \+ the 1 query heads must be at most total_heads, got "
                                         r"head_offset 1 and total_heads 1"):
        torch.ops.mha_ext.attention_forward(q, q, q, None, None, "none", 1.0, 0.5,
                                            torch.tensor([1, 2, 0, 0, 1, 1]))
