"""Nested tensors: jagged ones in mha_ext.scaled_dot_product_attention (run on the varlen kernels) against torch's
SDPA and the fp64 reference per sequence, and nested inputs to mha_ext.nn.MultiheadAttention against torch's layer
and against the padded layer with a key padding mask."""

from __future__ import annotations

import pytest
import torch

import mha_ext
import mha_ext.nn
from helpers.reference import reference_attention

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

LENGTHS_Q = [5, 1, 9, 3]
LENGTHS_K = [7, 2, 9, 1]


def jagged(tensors):
    """(B, H, j, D) from per-sequence (L, H, D) leaves, as torch's SDPA takes nested inputs."""
    return torch.nested.as_nested_tensor(tensors, layout=torch.jagged).transpose(1, 2)


def sequences(lengths, heads, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(L, heads, dim, generator=gen, dtype=torch.float32).to(dtype).requires_grad_() for L in lengths]


def per_sequence_reference(qs, ks, vs, **kwargs):
    return [reference_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kwargs).transpose(0, 1)
            for q, k, v in zip(qs, ks, vs)]


@pytest.mark.parametrize("is_causal", [False, True, "lower_right"])
def test_jagged_sdpa_matches_the_reference_per_sequence_with_gradients(is_causal):
    qs, ks, vs = sequences(LENGTHS_Q, 4, 8), sequences(LENGTHS_K, 2, 8, seed=1), sequences(LENGTHS_K, 2, 6, seed=2)
    out, lse = mha_ext.scaled_dot_product_attention(jagged(qs), jagged(ks), jagged(vs), is_causal=is_causal,
                                                    enable_gqa=True, return_lse=True)
    assert out.is_nested and out.layout == torch.jagged and out.shape[:2] == (4, 4) and out.shape[-1] == 6
    assert lse.is_nested and lse.shape[:2] == (4, 4)
    expected = per_sequence_reference(qs, ks, vs, is_causal=is_causal)
    for got, want in zip(out.transpose(1, 2).unbind(), expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad_out = [torch.randn_like(e) for e in expected]
    got = torch.autograd.grad(out.transpose(1, 2).values(), qs + ks + vs, torch.cat(grad_out))
    want = torch.autograd.grad(expected, qs + ks + vs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_jagged_sdpa_matches_torch_and_keeps_the_ragged_size():
    qs = sequences(LENGTHS_Q, 2, 8, dtype=torch.float32)
    q = jagged(qs)
    out = mha_ext.scaled_dot_product_attention(q, q, q)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out.transpose(1, 2).values(), expected.transpose(1, 2).values(), atol=2e-6, rtol=2e-5)
    assert (out + q).shape == q.shape  # the same nested int: composes with the inputs


@pytest.mark.parametrize("change, error, match", [
    (dict(attn_mask=torch.ones(4, 1, 9, 9, dtype=torch.bool)), ValueError, "attn_mask is not supported with nested"),
    (dict(key=torch.randn(4, 2, 9, 8)), TypeError, "key must be a nested tensor too"),
    (dict(query=torch.nested.nested_tensor([torch.randn(2, 5, 8)])), TypeError, "mha_ext takes layout=torch.jagged"),
])
def test_jagged_sdpa_errors(change, error, match):
    q = jagged(sequences(LENGTHS_Q, 2, 8, dtype=torch.float32))
    args = {**dict(query=q, key=q, value=q), **change}
    with pytest.raises(error, match=match):
        mha_ext.scaled_dot_product_attention(**args)


def layers(embed_dim=16, heads=4, **kwargs):
    torch.manual_seed(0)
    ours = mha_ext.nn.MultiheadAttention(embed_dim, heads, batch_first=True, **kwargs)
    theirs = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("average", [True, False])
def test_layer_takes_torchs_strided_nested_inputs_like_torchs_fast_path(average):
    ours, theirs = layers()
    ours.eval(), theirs.eval()
    x = torch.nested.nested_tensor([torch.randn(L, 16) for L in LENGTHS_Q])
    with torch.no_grad():
        out, weights = ours(x, x, x, average_attn_weights=average)
        expected, expected_weights = theirs(x, x, x, average_attn_weights=average)
    assert out.is_nested and out.layout == torch.strided
    for got, want in zip(out.unbind(), expected.unbind()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(weights, expected_weights, atol=2e-6, rtol=2e-5)


def test_layer_trains_on_jagged_inputs_as_the_padded_layer_with_a_key_padding_mask():
    ours, _ = layers(kdim=12, vdim=10)
    padded_layer, _ = layers(kdim=12, vdim=10)
    gen = torch.Generator().manual_seed(3)
    queries = [torch.randn(L, 16, generator=gen) for L in LENGTHS_Q]
    keys = [torch.randn(S, 12, generator=gen) for S in LENGTHS_K]
    values = [torch.randn(S, 10, generator=gen) for S in LENGTHS_K]
    nested = [torch.nested.as_nested_tensor(t, layout=torch.jagged) for t in (queries, keys, values)]
    out, _ = ours(*nested, need_weights=False)
    assert out.is_nested and out.layout == torch.jagged
    pad = torch.nn.utils.rnn.pad_sequence
    key_padding = torch.arange(max(LENGTHS_K)) >= torch.tensor(LENGTHS_K)[:, None]  # True = ignore (torch's)
    expected, _ = padded_layer(pad(queries, batch_first=True), pad(keys, batch_first=True),
                               pad(values, batch_first=True), key_padding_mask=key_padding, need_weights=False)
    grad = [torch.randn(L, 16, generator=gen) for L in LENGTHS_Q]
    for got, want in zip(out.unbind(), expected.unbind()):
        torch.testing.assert_close(got, want[:got.size(0)], atol=2e-6, rtol=2e-5)
    out.values().backward(torch.cat(grad))
    expected.backward(pad(grad, batch_first=True))
    for (name, p), q in zip(ours.named_parameters(), padded_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kwargs, call, match", [
    (dict(), lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(4, 9, dtype=torch.bool)), "not supported with nested"),
    (dict(), lambda m, x: m(x, torch.randn(4, 9, 16), x), "key must be a nested"),
    (dict(add_bias_kv=True), lambda m, x: m(x, x, x), "add_bias_kv and add_zero_attn"),
])
def test_layer_nested_errors(kwargs, call, match):
    ours, _ = layers(**kwargs)
    x = torch.nested.as_nested_tensor([torch.randn(L, 16) for L in LENGTHS_Q], layout=torch.jagged)
    with pytest.raises(ValueError, match=match):
        call(ours, x)


def test_layer_nested_needs_batch_first():
    layer = mha_ext.nn.MultiheadAttention(16, 4)
    x = torch.nested.as_nested_tensor([torch.randn(L, 16) for L in LENGTHS_Q], layout=torch.jagged)
    with pytest.raises(ValueError, match="batch_first=True"):
        layer(x, x, x)
