"""White-box tests of the CPU kernels: their tiling (key tiles beyond the transposed-key ring, query-tile
groups, wide query tiles, decode rows), their engines (bfloat16 tile products, the built-in GEMM, the AVX2
and AVX-512 row passes, switched with mha_ext.settings), thread-count independence and huge pages. Each is a
case chosen to reach one of those paths, compared with the fp64 reference; the black-box API tests are
test_forward.py, test_backward.py and the others."""

from __future__ import annotations

import zlib

import pytest
import torch

import mha_ext
from mha_ext import _loader
from helpers.reference import (TOLERANCES, assert_close_to_reference, at_thread_counts, leaf, make_qkv,
                               reference_attention)


AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _loader.cpu_flags()


@pytest.mark.parametrize("setting, info_key, expected", [
    ({"cpu_gemm": "native"}, "cpu_gemm", "native"),
    ({"cpu_isa": "avx2"}, "cpu_isa", "row passes avx2"),
    pytest.param({"cpu_isa": "avx512"}, "cpu_isa", "row passes avx512",
                 marks=pytest.mark.skipif(not AVX512, reason="the CPU lacks AVX-512")),
], ids=["native_gemm", "avx2_row_passes", "avx512_without_bf16_instructions"])
def test_fallback_engines_match_reference(setting, info_key, expected):
    """The portable matrix products (used where torch exports no BLAS), the AVX2 softmax row passes (used
    on CPUs without AVX-512) and the AVX-512 ones without AVX512-BF16's conversions give the same results:
    forward and gradients in float64, forward and gradients in float32 (whose row passes are the vectorised
    ones), forward in bfloat16 (the passes rounding probabilities to bf16), with odd sizes for the row tails."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, n, 24, generator=g, dtype=torch.float64) for n in (37, 70, 70))
    m = torch.rand(2, 1, 37, 70, generator=g) > 0.3
    g_out = torch.randn(2, 3, 37, 24, generator=g, dtype=torch.float64)
    qr, kr, vr = (leaf(t) for t in (q, k, v))
    reference_attention(qr, kr, vr, attn_mask=m, is_causal=True).backward(g_out)
    with mha_ext.settings(**setting):
        assert expected in mha_ext.build_info()[info_key]
        explained = mha_ext.explain(q, k, v, attn_mask=m, is_causal=True)
        assert expected.split()[-1] in (explained.facts["cpu_gemm"], explained.facts["row passes"])
        for dtype in (torch.float64, torch.float32):
            qa, ka, va = (leaf(t.to(dtype)) for t in (q, k, v))
            out = mha_ext.scaled_dot_product_attention(qa, ka, va, attn_mask=m, is_causal=True)
            assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=m, is_causal=True), dtype)
            out.backward(g_out.to(dtype))
            for ours, expected_grad in ((qa, qr), (ka, kr), (va, vr)):
                assert_close_to_reference(ours.grad, expected_grad.grad, dtype, scale=5)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        out = mha_ext.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, is_causal=True)
        assert_close_to_reference(out, reference_attention(qb, kb, vb, attn_mask=m, is_causal=True), torch.bfloat16)
    assert mha_ext.current_settings() == {"cpu_gemm": "blas", "cpu_isa": "auto", "cuda_tensor_cores": True}


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


@pytest.mark.slow
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
