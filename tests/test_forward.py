"""Forward results against the fp64 reference and torch's SDPA, over shapes, masks, dtypes and layouts."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mha_ext
from helpers.reference import DEVICES, assert_close_to_reference, make_qkv, reference_attention

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LENGTHS = [1, 7, 33, 257]


# Every mask rank and broadcast pattern, as a shape over (B=2, Hq=4, L, S).
MASK_SHAPES = [
    lambda L, S: (L, S),
    lambda L, S: (1, S),
    lambda L, S: (L, 1),
    lambda L, S: (4, L, S),
    lambda L, S: (4, 1, S),
    lambda L, S: (2, 1, L, S),
    lambda L, S: (2, 4, L, S),
    lambda L, S: (2, 1, 1, S),
    lambda L, S: (1, 4, L, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(1, 1), (7, 33), (33, 7), (257, 33), (33, 257)])
def test_no_mask_matches_reference(device, dtype, L, S):
    gen = torch.Generator().manual_seed(L * 1000 + S)
    q, k, v = make_qkv(2, 3, 3, L, S, 24, 24, dtype, device, gen)
    out = mha_ext.scaled_dot_product_attention(q, k, v)
    assert out.dtype == dtype and out.shape == (2, 3, L, 24)
    assert_close_to_reference(out, reference_attention(q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float", "bias"])
def test_every_mask_shape(device, dtype, mask_shape, kind):
    L, S = 33, 70
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{dtype}{mask_shape(L, S)}".encode()))
    q, k, v = make_qkv(2, 4, 4, L, S, 16, 16, dtype, device, gen)
    shape = mask_shape(L, S)
    if kind == "bool":
        mask = (torch.rand(shape, generator=gen) > 0.4).to(device)
    else:
        mask = (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype)
    if kind == "bias":
        out = mha_ext.scaled_dot_product_attention(q, k, v, attn_bias=mask)
        assert_close_to_reference(out, reference_attention(q, k, v, attn_bias=mask), dtype)
    else:
        out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(7, 33), (33, 7), (257, 129), (1, 257)])
def test_bool_mask_bias_and_causal_together(device, dtype, L, S):
    gen = torch.Generator().manual_seed(7 * L + S)
    q, k, v = make_qkv(2, 4, 4, L, S, 32, 32, dtype, device, gen)
    mask = (torch.rand(2, 1, 1, S, generator=gen) > 0.3).to(device)  # key padding
    bias = torch.randn(4, L, S, generator=gen).to(device=device, dtype=dtype)  # per-head bias
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    expected = reference_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    assert_close_to_reference(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_mask_with_low_precision_query(device, dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8, 8, dtype, device, gen)
    mask = torch.randn(9, 13, generator=gen).to(device)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 1), (4, 4)])
def test_grouped_query_attention(device, dtype, Hq, Hkv):
    gen = torch.Generator().manual_seed(Hq * 10 + Hkv)
    q, k, v = make_qkv(2, Hq, Hkv, 33, 65, 16, 40, dtype, device, gen)
    mask = (torch.rand(Hq, 33, 65, generator=gen) > 0.5).to(device)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == (2, Hq, 33, 40)
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,Ev", [(5, 3), (64, 128), (512, 512), (130, 1)])
def test_head_dims_value_dim_differs(device, E, Ev):
    gen = torch.Generator().manual_seed(E + Ev)
    q, k, v = make_qkv(1, 2, 2, 17, 23, E, Ev, torch.float32, device, gen)
    out = mha_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (1, 2, 17, Ev)
    assert_close_to_reference(out, reference_attention(q, k, v, is_causal=True), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", [(), (3,), (2, 3), (2, 1, 3)])
def test_any_number_of_leading_dims(device, leading):
    gen = torch.Generator().manual_seed(len(leading))
    q = torch.randn(*leading, 11, 8, generator=gen).to(device)
    k = torch.randn(*leading, 13, 8, generator=gen).to(device)
    v = torch.randn(*leading, 13, 6, generator=gen).to(device)
    mask = (torch.rand(11, 13, generator=gen) > 0.3).to(device)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == (*leading, 11, 6)
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_fused_projection_are_read_in_place(device):
    gen = torch.Generator().manual_seed(11)
    B, L, H, E = 2, 37, 3, 16
    qkv = torch.randn(B, L, 3, H, E, generator=gen).to(device)  # one fused (B, L, 3, H, E) projection
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, E) views, no copies
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask = (torch.rand(B, 1, 1, L, generator=gen) > 0.2).to(device)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_unit_last_stride_is_copied_and_correct(device):
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 2, 8, 9, generator=gen).to(device).transpose(-1, -2)  # (2, 2, 9, 8), last stride 9
    k = torch.randn(2, 2, 10, 8, generator=gen).to(device)
    v = torch.randn(2, 2, 6, 10, generator=gen).to(device).transpose(-1, -2)
    assert q.stride(-1) != 1 and v.stride(-1) != 1
    out = mha_ext.scaled_dot_product_attention(q, k, v)
    assert_close_to_reference(out, reference_attention(q, k, v), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_mask_strides(device):
    gen = torch.Generator().manual_seed(13)
    q, k, v = make_qkv(1, 2, 2, 19, 21, 8, 8, torch.float32, device, gen)
    mask = (torch.rand(21, 19, generator=gen) > 0.3).to(device).t()  # column stride 19
    bias = torch.randn(21, 19, generator=gen).to(device).t()
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias)
    expected = reference_attention(q, k, v, attn_mask=mask, attn_bias=bias)
    assert_close_to_reference(out, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zero_not_nan(device, dtype):
    gen = torch.Generator().manual_seed(14)
    q, k, v = make_qkv(2, 2, 2, 9, 70, 8, 8, dtype, device, gen)
    mask = (torch.rand(2, 2, 9, 70, generator=gen) > 0.5).to(device)
    mask[0, 1, 3] = False
    mask[1, :, 0] = False
    float_mask = torch.zeros(9, 70, device=device, dtype=dtype)
    float_mask[5] = float("-inf")
    out, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=float_mask, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[0, 1, 3] == 0).all() and (out[1, :, 0] == 0).all() and (out[:, :, 5] == 0).all()
    assert torch.isneginf(lse[0, 1, 3]) and torch.isneginf(lse[:, :, 5]).all()
    expected = reference_attention(q, k, v, attn_mask=mask, attn_bias=float_mask)
    assert_close_to_reference(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_with_more_queries_than_keys_leaves_no_row_empty_here(device):
    # Top-left alignment: with L > S, rows i >= S see every key; row 0 sees key 0 only.
    gen = torch.Generator().manual_seed(15)
    q, k, v = make_qkv(1, 1, 1, 40, 9, 8, 8, torch.float32, device, gen)
    out = mha_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    assert_close_to_reference(out, reference_attention(q, k, v, is_causal=True), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(16)
    q, k, v = make_qkv(2, 3, 3, 33, 47, 16, 16, dtype, device, gen)
    mask = (torch.rand(33, 47, generator=gen) > 0.3).to(device)
    _, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    _, expected = reference_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (2, 3, 33)
    assert_close_to_reference(lse, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_merges_partial_attentions(device):
    # What return_lse is for: attention over keys [0, S) equals the LSE-weighted merge of two halves.
    gen = torch.Generator().manual_seed(17)
    q, k, v = make_qkv(2, 2, 2, 21, 50, 16, 16, torch.float64, device, gen)
    o1, l1 = mha_ext.scaled_dot_product_attention(q, k[:, :, :20], v[:, :, :20], return_lse=True)
    o2, l2 = mha_ext.scaled_dot_product_attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse).unsqueeze(-1) + o2 * torch.exp(l2 - lse).unsqueeze(-1)
    torch.testing.assert_close(merged, mha_ext.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lengths(device):
    q = torch.randn(2, 3, 0, 8, device=device)
    k = torch.randn(2, 3, 5, 8, device=device)
    v = torch.randn(2, 3, 5, 4, device=device)
    assert mha_ext.scaled_dot_product_attention(q, k, v).shape == (2, 3, 0, 4)
    # S = 0: nothing to attend, so every row is 0 and its LSE -inf.
    q = torch.randn(2, 3, 6, 8, device=device)
    out, lse = mha_ext.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert out.shape == (2, 3, 6, 4) and (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(6))
def test_matches_torch_sdpa_math_backend(dtype, case):
    gen = torch.Generator().manual_seed(100 + case)
    B, H, L, S, E, Ev = 2, 4, *[(7, 33), (33, 7), (257, 33), (1, 257), (33, 33), (64, 128)][case], 16, 24
    q, k, v = make_qkv(B, H, H, L, S, E, Ev, dtype, "cpu", gen)
    mask = torch.rand(B, 1, L, S, generator=gen) > 0.2
    mask[..., 0] = True  # torch gives NaN for fully masked rows, we give 0: keep every row attended
    bias = torch.randn(1, H, L, S, generator=gen, dtype=dtype)
    with sdpa_kernel(SDPBackend.MATH):
        for kwargs in [{}, {"attn_mask": mask}, {"attn_mask": bias}, {"is_causal": L <= S}]:
            expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
            assert_close_to_reference(mha_ext.scaled_dot_product_attention(q, k, v, **kwargs), expected, dtype)
        expected = F.scaled_dot_product_attention(q.repeat(1, 2, 1, 1), k, v, enable_gqa=True, scale=0.3)
        actual = mha_ext.scaled_dot_product_attention(q.repeat(1, 2, 1, 1), k, v, enable_gqa=True, scale=0.3)
        assert_close_to_reference(actual, expected, dtype)


def test_seed_004_tensorflow_worked_example():
    """The TensorFlow tutorial's worked example (seed 004): its printed weights and outputs."""
    k = torch.tensor([[10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10]], dtype=torch.float32)
    v = torch.tensor([[1, 0], [10, 0], [100, 5], [1000, 6]], dtype=torch.float32)
    q = torch.tensor([[0, 0, 10], [0, 10, 0], [10, 10, 0]], dtype=torch.float32)
    out = mha_ext.scaled_dot_product_attention(q, k, v)
    weights = mha_ext.attention_weights(q, k)
    torch.testing.assert_close(weights, torch.tensor([[0, 0, 0.5, 0.5], [0, 1, 0, 0], [0.5, 0.5, 0, 0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out, torch.tensor([[550.0, 5.5], [10.0, 0.0], [5.5, 0.0]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_weights_match_reference_softmax(device, dtype):
    gen = torch.Generator().manual_seed(18)
    q, k, _ = make_qkv(2, 4, 2, 19, 150, 16, 16, dtype, device, gen)
    mask = (torch.rand(2, 1, 19, 150, generator=gen) > 0.3).to(device)
    mask[1, 0, 4] = False
    bias = torch.randn(4, 1, 150, generator=gen).to(device=device, dtype=dtype)
    weights = mha_ext.attention_weights(q, k, attn_mask=mask, attn_bias=bias, is_causal=True, enable_gqa=True)
    kk = k.double().repeat_interleave(2, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) / 4 + bias.double()
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.masked_fill(~torch.ones(19, 150, dtype=torch.bool, device=device).tril(), float("-inf"))
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    assert (weights[1, :, 4] == 0).all()
    assert_close_to_reference(weights, expected, dtype)
    _, lse = mha_ext.scaled_dot_product_attention(q, k, k, attn_mask=mask, attn_bias=bias, is_causal=True,
                                                  enable_gqa=True, return_lse=True)
    reused = mha_ext.attention_weights(q, k, attn_mask=mask, attn_bias=bias, is_causal=True, enable_gqa=True, lse=lse)
    torch.testing.assert_close(reused, weights, atol=0, rtol=0)


