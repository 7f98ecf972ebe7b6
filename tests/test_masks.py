"""mha_ext.masks: each helper against an explicit construction of its convention and a float64 reference."""

import math

import pytest
import torch

import mha_ext
import mha_ext.masks as masks

N, H, L, S, D = 3, 2, 5, 7, 6


def qkv(seed, n=N, h=H, l=L, s=S):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, length, D, generator=gen) for length in (l, s, s))


def reference(q, k, v, additive):
    """float64 softmax((q k^T) / sqrt(D) + additive) v, the textbook formula the conventions are defined by."""
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(D) + additive.double()
    return torch.softmax(scores, dim=-1) @ v.double()


def assert_close_rows(actual, expected, rows):
    """Compare the query rows selected by ``rows`` (broadcast over the batch/head dims of ``actual``)."""
    rows = rows.expand(actual.shape[:-1])
    assert rows.any()
    torch.testing.assert_close(actual[rows].double(), expected[rows], atol=2e-5, rtol=2e-5)


def test_causal_is_lower_triangular_top_left():
    mask = masks.causal(L, S)
    assert mask.dtype == torch.bool and mask.shape == (L, S)
    for i in range(L):
        for j in range(S):
            assert bool(mask[i, j]) == (j <= i)
    assert torch.equal(masks.causal(4), masks.causal(4, 4))
    q, k, v = qkv(0)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    explicit = torch.tensor([[0.0 if j <= i else -math.inf for j in range(S)] for i in range(L)])
    assert_close_rows(out, reference(q, k, v, explicit), torch.ones(L, dtype=torch.bool))
    with pytest.raises(ValueError, match="S must be a non-negative int, got -1"):
        masks.causal(3, -1)


def test_key_padding_from_lengths():
    lengths = torch.tensor([7, 2, 0])
    mask = masks.key_padding_from_lengths(lengths)
    assert mask.shape == (N, 1, 1, 7) and mask.dtype == torch.bool
    expected = torch.tensor([[j < n for j in range(7)] for n in (7, 2, 0)])
    assert torch.equal(mask[:, 0, 0], expected)
    assert masks.key_padding_from_lengths(torch.tensor([1, 3, 2]), max_len=S).shape == (N, 1, 1, S)
    q, k, v = qkv(1)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    additive = torch.zeros(N, 1, 1, S).masked_fill(~expected[:, None, None, :], -math.inf)
    has_keys = (lengths > 0)[:, None, None]
    assert_close_rows(out, reference(q, k, v, additive), has_keys)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # no key at all: zeros, not NaN
    with pytest.raises(ValueError, match="max_len must be at least lengths.max"):
        masks.key_padding_from_lengths(lengths, max_len=3)
    with pytest.raises(ValueError, match="lengths must be a 1-D integer tensor"):
        masks.key_padding_from_lengths(torch.tensor([1.0, 2.0]))


def test_from_attention_mask_bert_convention():
    """BERT / Hugging Face: 1 = attend, 0 = masked; BERT adds (1 - mask) * -10000 to the scores."""
    gen = torch.Generator().manual_seed(2)
    mask_2d = (torch.rand(N, S, generator=gen) < 0.7).long()
    mask_2d[:, 0] = 1
    converted = masks.from_attention_mask(mask_2d)
    assert converted.shape == (N, 1, 1, S) and torch.equal(converted[:, 0, 0], mask_2d == 1)
    q, k, v = qkv(3)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=converted)
    bert_adder = (1.0 - mask_2d[:, None, None, :].double()) * -10000.0
    assert_close_rows(out, reference(q, k, v, bert_adder), torch.ones(L, dtype=torch.bool))

    mask_3d = (torch.rand(N, L, S, generator=gen) < 0.7).int()  # BERT's [batch, from_seq, to_seq]
    mask_3d[..., 0] = 1
    converted = masks.from_attention_mask(mask_3d)
    assert converted.shape == (N, 1, L, S)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=converted)
    bert_adder = (1.0 - mask_3d[:, None].double()) * -10000.0
    assert_close_rows(out, reference(q, k, v, bert_adder), torch.ones(L, dtype=torch.bool))


def test_from_attention_mask_bool_is_a_view_and_additive_masks_are_rejected():
    keep = torch.rand(N, S) < 0.5
    converted = masks.from_attention_mask(keep)
    assert converted.data_ptr() == keep.data_ptr() and converted._base is keep
    with pytest.raises(ValueError, match="attention_mask must contain only 0 and 1, got value -10000"):
        masks.from_attention_mask(torch.tensor([[0.0, -10000.0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(N, S\) or \(N, L, S\)"):
        masks.from_attention_mask(torch.ones(S))


def test_from_tf_mask_tensorflow_convention():
    """TensorFlow tutorial: 1 = masked, added to the logits as mask * -1e9."""
    look_ahead = 1.0 - torch.ones(L, S).tril()  # TF's create_look_ahead_mask, generalised to L != S
    padding = torch.zeros(N, 1, 1, S)
    padding[1, ..., 4:] = 1.0
    tf_mask = torch.maximum(look_ahead, padding)
    converted = masks.from_tf_mask(tf_mask)
    assert converted.shape == tf_mask.shape and torch.equal(converted, tf_mask == 0)
    q, k, v = qkv(4)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=converted)
    assert_close_rows(out, reference(q, k, v, tf_mask * -1e9), torch.ones(L, dtype=torch.bool))
    assert torch.equal(masks.from_tf_mask(tf_mask.bool()), converted)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1, got value 0.5"):
        masks.from_tf_mask(torch.tensor([0.0, 0.5]))


def test_query_key_mask_matches_the_outer_product():
    """Per-token masks on both sides (1 = keep), combined as torch.bmm(q_mask.unsqueeze(-1), k_mask.unsqueeze(1))."""
    gen = torch.Generator().manual_seed(5)
    query_mask = (torch.rand(N, L, generator=gen) < 0.7).long()
    key_mask = (torch.rand(N, S, generator=gen) < 0.7).long()
    query_mask[0, 1], key_mask[:, 0] = 0, 1
    converted = masks.query_key_mask(query_mask, key_mask)
    outer = torch.bmm(query_mask.unsqueeze(-1).float(), key_mask.unsqueeze(1).float())
    assert converted.shape == (N, 1, L, S) and torch.equal(converted[:, 0], outer != 0)
    q, k, v = qkv(6)
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=converted)
    additive = torch.zeros(N, 1, L, S).masked_fill(outer[:, None] == 0, -math.inf)
    kept = query_mask.bool()[:, None, :]
    assert_close_rows(out, reference(q, k, v, additive), kept)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))  # a masked query: zeros, not NaN
    with pytest.raises(ValueError, match="query_mask must be"):
        masks.query_key_mask(query_mask, key_mask[:2])


def test_from_torch_key_padding_mask():
    """nn.MultiheadAttention: bool True = ignore (padding); float = added."""
    ignore = torch.rand(N, S) < 0.3
    converted = masks.from_torch_key_padding_mask(ignore)
    assert converted.shape == (N, 1, 1, S) and torch.equal(converted[:, 0, 0], ~ignore)
    additive = torch.randn(N, S)
    view = masks.from_torch_key_padding_mask(additive)
    assert view.shape == (N, 1, 1, S) and view.data_ptr() == additive.data_ptr() and view._base is additive
    assert masks.from_torch_key_padding_mask(torch.zeros(S, dtype=torch.bool)).shape == (1, 1, S)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating tensor, got dtype torch.int64"):
        masks.from_torch_key_padding_mask(torch.zeros(N, S, dtype=torch.long))


def test_from_torch_attn_mask():
    """nn.MultiheadAttention: bool True = not allowed; float = added; (L, S) or (N * num_heads, L, S)."""
    per_head = torch.randn(N * H, L, S)
    view = masks.from_torch_attn_mask(per_head, H)
    assert view.shape == (N, H, L, S) and view._base is per_head
    assert torch.equal(view[1, 0], per_head[H])  # batch-major, like torch's view(bsz, num_heads, L, S)
    forbidden = torch.rand(L, S) < 0.3
    assert torch.equal(masks.from_torch_attn_mask(forbidden, H), ~forbidden)
    shared = torch.randn(L, S)
    assert masks.from_torch_attn_mask(shared, H) is shared
    with pytest.raises(ValueError, match=r"\(N \* num_heads, L, S\) with num_heads=4, got shape \(6, 5, 7\)"):
        masks.from_torch_attn_mask(per_head, 4)


def test_to_additive():
    keep = torch.tensor([[True, False, True]])
    expected = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    assert torch.equal(masks.to_additive(keep, torch.float64), expected)
    q, k, v = qkv(7)
    keep = torch.rand(N, 1, 1, S) < 0.7
    keep[..., 0] = True
    a = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    b = mha_ext.scaled_dot_product_attention(q, k, v, attn_bias=masks.to_additive(keep))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        masks.to_additive(torch.zeros(2))


@pytest.mark.parametrize("per_batch", [False, True])
def test_apply_head_mask_scales_each_head(per_batch):
    """head_mask: per-head multiplicative weights on the attention probabilities (Hugging Face)."""
    q, k, v = qkv(8)
    head_mask = torch.rand(N, H) if per_batch else torch.tensor([1.0, 0.0])
    out = masks.apply_head_mask(mha_ext.scaled_dot_product_attention(q, k, v), head_mask)
    probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(D), dim=-1)
    weights = head_mask.double().view(-1 if per_batch else 1, H, 1, 1)
    expected = (probs * weights) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"head_mask must be \(H,\) or \(N, H\) with H = 2"):
        masks.apply_head_mask(out, torch.ones(3))
