"""Forward results against the fp64 reference and torch's SDPA, over shapes, masks, dtypes and layouts."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mha_ext
from mha_ext import _loader
from conftest import DEVICES, at_thread_counts, assert_close_to_reference, reference_attention

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LENGTHS = [1, 7, 33, 257]


def make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    return randn(B, Hq, L, E), randn(B, Hkv, S, E), randn(B, Hkv, S, Ev)


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


@pytest.mark.parametrize("env, info_key, expected", [
    ({"MHA_EXT_CPU_GEMM": "native"}, "cpu_gemm", "native"),
    ({"MHA_EXT_CPU_ISA": "avx2"}, "cpu_isa", "row passes avx2"),
    pytest.param({"MHA_EXT_CPU_ISA": "avx512"}, "cpu_isa", "row passes avx512", marks=pytest.mark.skipif(
        not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _loader.cpu_flags(), reason="the CPU lacks AVX-512")),
], ids=["native_gemm", "avx2_row_passes", "avx512_without_bf16_instructions"])
def test_fallback_engines_match_reference(env, info_key, expected):
    """The portable matrix products (used where torch exports no BLAS), the AVX2 softmax row passes (used
    on CPUs without AVX-512) and the AVX-512 ones without AVX512-BF16's conversions give the same results:
    forward and gradients in float64, forward and gradients in float32 (whose row passes are the vectorised
    ones), forward in bfloat16 (the passes rounding probabilities to bf16), with odd sizes for the row tails."""
    import subprocess
    import sys
    import os

    code = (
        "import torch, mha_ext, sys; sys.path.insert(0, 'tests');"
        "from conftest import reference_attention, assert_close_to_reference;"
        f"assert {expected!r} in mha_ext.build_info()[{info_key!r}], mha_ext.build_info();"
        "g = torch.Generator().manual_seed(5);"
        "q, k, v = (torch.randn(2, 3, n, 24, generator=g, dtype=torch.float64) for n in (37, 70, 70));"
        "m = torch.rand(2, 1, 37, 70, generator=g) > 0.3;"
        "qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v));"
        "out = mha_ext.scaled_dot_product_attention(qa, ka, va, attn_mask=m, is_causal=True);"
        "assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=m, is_causal=True), torch.float64);"
        "qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v));"
        "g_out = torch.randn_like(out);"
        "out.backward(g_out); reference_attention(qr, kr, vr, attn_mask=m, is_causal=True).backward(g_out);"
        "[torch.testing.assert_close(a.grad, b.grad) for a, b in ((qa, qr), (ka, kr), (va, vr))];"
        "qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v));"
        "out = mha_ext.scaled_dot_product_attention(qf, kf, vf, attn_mask=m, is_causal=True);"
        "assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=m, is_causal=True), torch.float32);"
        "out.backward(g_out.float());"
        "[torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4) for a, b in ((qf, qr), (kf, kr), (vf, vr))];"
        "qb, kb, vb = (t.bfloat16() for t in (q, k, v));"
        "out = mha_ext.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, is_causal=True);"
        "assert_close_to_reference(out, reference_attention(qb, kb, vb, attn_mask=m, is_causal=True), torch.bfloat16);"
        "print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(19)
    q, k, v = make_qkv(2, 3, 3, 130, 200, 32, 32, torch.float32, "cpu", gen)
    one, many = at_thread_counts(lambda: mha_ext.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(one, many)


def test_keys_beyond_the_transposed_key_ring():
    # Each thread keeps K^T of its kv head in a ring of at most 8 MiB (csrc/cpu/key_tiles.h): with E = 256
    # that is 8192 keys, so S = 8300 wraps it, and the two query heads sharing the kv head (GQA) reuse it.
    gen = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(1, 2, 1, 70, 8300, 256, 256, torch.float32, "cpu", gen)
    mask = torch.rand(1, 1, 70, 8300, generator=gen) > 0.2
    grad_out = torch.randn(1, 2, 70, 256, generator=gen)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mha_ext.scaled_dot_product_attention(*inputs, attn_mask=mask, enable_gqa=True)
    out.backward(grad_out)
    reference_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*reference_inputs, attn_mask=mask)
    expected.backward(grad_out.double())
    assert_close_to_reference(out, expected, torch.float32)
    for ours, ref in zip(inputs, reference_inputs):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masks", ["none", "causal_and_bool", "lone_bias"])
def test_query_tiles_grouped_where_key_values_leave_the_cache(dtype, masks):
    """Where a kv head's K and V exceed 1 MiB in float (here S = 1100, E = Ev = 128), work items take four
    64-row query tiles through each key tile (csrc/cpu/forward.cpp): 300 query rows make one full group and a
    partial one of 44 rows, causality gives each tile its own key span, and GQA shares the kv head."""
    gen = torch.Generator().manual_seed(zlib.crc32(masks.encode()) + dtype.itemsize)
    q, k, v = make_qkv(1, 4, 2, 300, 1100, 128, 128, dtype, "cpu", gen)
    mask = bias = None
    if masks == "causal_and_bool":
        mask = torch.rand(1, 1, 300, 1100, generator=gen) > 0.3
    elif masks == "lone_bias":
        bias = torch.randn(1, 4, 300, 1100, generator=gen).to(dtype)
    causal = masks == "causal_and_bool"
    out, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                                    enable_gqa=True, return_lse=True)
    expected, expected_lse = reference_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                                 return_lse=True)
    assert_close_to_reference(out, expected, dtype)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-3 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("masks", ["none", "bool_and_bias", "causal"])
def test_wide_query_tiles_at_large_head_dims(dtype, masks):
    """Float products at head dims from 256 without causality take 256-row query tiles (csrc/cpu/forward.cpp):
    300 query rows make a full tile and a 44-row one, with E = 256 and Ev = 320, a bool mask and a bias
    together; causal runs keep 64-row tiles."""
    gen = torch.Generator().manual_seed(zlib.crc32(masks.encode()) + dtype.itemsize)
    q, k, v = make_qkv(2, 2, 2, 300, 301, 256, 320, dtype, "cpu", gen)
    mask = bias = None
    if masks == "bool_and_bias":
        mask = torch.rand(2, 1, 1, 301, generator=gen) > 0.4
        bias = torch.randn(2, 300, 301, generator=gen).to(dtype)
    causal = masks == "causal"
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal)
    expected = reference_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal)
    assert_close_to_reference(out, expected, dtype)


@pytest.mark.parametrize("case", ["odd_spans", "unaligned_views", "ring_wraps", "odd_head_dim"])
def test_bf16_tile_products_match_reference(case):
    """bf16 inputs multiplied as bf16 (the VNNI tile products, where the CPU has them) and widened to float32
    (torch.backends.mkldnn off) both match the fp64 reference: odd key spans under causality and a bool mask
    (the padded pair column), views whose rows start at odd bf16 offsets, keys beyond the per-thread ring
    of packed K^T/V with GQA, and an odd head dim (which always widens)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    mask = None
    if case == "odd_spans":
        q, k, v = make_qkv(2, 4, 2, 131, 197, 64, 96, torch.bfloat16, "cpu", gen)
        mask = torch.rand(2, 1, 131, 197, generator=gen) > 0.3
    elif case == "unaligned_views":
        wide = torch.randn(2, 37, 3, 3, 33, generator=gen).to(torch.bfloat16)  # fused projection, one pad column
        q, k, v = (wide[:, :, i, :, 1:].transpose(1, 2) for i in range(3))  # rows start at odd offsets
        mask = torch.rand(2, 1, 1, 37, generator=gen) > 0.2
    elif case == "ring_wraps":
        # K^T and V of a kv head take (E + Ev) * 2 bytes per key; the 8 MiB ring holds 8192 keys at E = Ev = 256.
        q, k, v = make_qkv(1, 2, 1, 70, 8300, 256, 256, torch.bfloat16, "cpu", gen)
    else:
        q, k, v = make_qkv(2, 3, 3, 40, 50, 15, 16, torch.bfloat16, "cpu", gen)
    expected = reference_attention(q, k, v, attn_mask=mask, is_causal=case != "ring_wraps")
    for mkldnn in (True, False):
        previous, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, mkldnn
        try:
            products = mha_ext.build_info()["cpu_bf16_products"]
            out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case != "ring_wraps",
                                                       enable_gqa=True)
        finally:
            torch.backends.mkldnn.enabled = previous
        assert products == "float" or mkldnn, "VNNI products must not run with torch.backends.mkldnn off"
        assert_close_to_reference(out, expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_spanning_the_exponential_range(dtype):
    """Scores spread over hundreds (probabilities from 1 down to below float's smallest normal, where the
    vectorised exp flushes to 0) and an additive mask of -inf and large finite values: outputs and LSE
    match the fp64 reference."""
    gen = torch.Generator().manual_seed(41)
    q, k, v = make_qkv(2, 3, 3, 45, 77, 16, 16, dtype, "cpu", gen)
    q = (q.float() * 12).to(dtype)
    bias = torch.randn(45, 77, generator=gen) * 60
    bias[::3, ::5] = float("-inf")
    out, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias, return_lse=True)
    expected, expected_lse = reference_attention(q, k, v, attn_mask=bias, return_lse=True)
    assert_close_to_reference(out, expected, dtype)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4 * expected_lse.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("addend", ["none", "same_dtype", "float32"])
def test_decode_rows_match_reference(dtype, L, addend):
    """Decode-sized queries (fewer than 4 rows) take dot products and row updates straight from the K/V rows
    (bf16 ones without a converted copy): GQA, an odd key count for the vector tails, K/V as strided views
    of a cache, and a lone float mask (added in the row-maximum pass) in the query's dtype or float32."""
    gen = torch.Generator().manual_seed(L * 7 + len(addend))
    q = torch.randn(2, 8, L, 72, generator=gen).to(dtype)
    cache = torch.randn(2, 2, 1000, 2, 72, generator=gen).to(dtype)  # (B, Hkv, S_max, K|V, E)
    k, v = cache[:, :, :517, 0], cache[:, :, :517, 1]
    mask = None
    if addend != "none":
        mask = (torch.randn(2, 1, L, 517, generator=gen) * 3).to(dtype if addend == "same_dtype" else torch.float32)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), dtype)
