"""Drop-in parity with torch where torch defines the answer: broadcast batch and head dims, empty dims,
NaN / inf propagation, and nn.MultiheadAttention's dtype and exception behaviour. Each case runs torch's own
SDPA (or layer) on the same float64 inputs and compares outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mha_ext
import mha_ext.nn


def run_both(shapes, dtype=torch.float64, seed=0, **kwargs):
    """Outputs and input gradients of mha_ext's and torch's SDPA on the same inputs and output gradient."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, generator=gen, dtype=dtype) for shape in shapes]
    results = []
    for attend in (mha_ext.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = attend(*leaves, **kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    return results


BROADCASTS = {
    "key_value_one_head": [(2, 8, 5, 16), (2, 1, 7, 16), (2, 1, 7, 16)],
    "query_one_head": [(2, 1, 5, 16), (2, 8, 7, 16), (2, 8, 7, 12)],
    "query_batch_one": [(1, 8, 5, 16), (2, 8, 7, 16), (2, 8, 7, 16)],
    "key_value_batch_one": [(2, 8, 5, 16), (1, 8, 7, 16), (1, 8, 7, 16)],
    "key_batch_one_value_batch_two": [(2, 8, 5, 16), (1, 8, 7, 16), (2, 8, 7, 16)],
    "key_one_head_value_eight": [(2, 8, 5, 16), (2, 1, 7, 16), (2, 8, 7, 16)],
    "key_value_lower_rank": [(2, 8, 5, 16), (8, 7, 16), (8, 7, 16)],
    "query_higher_rank": [(3, 2, 8, 5, 16), (2, 8, 7, 16), (2, 8, 7, 16)],
    "three_dims_batch_one": [(1, 5, 16), (3, 7, 16), (3, 7, 16)],
    "everything_broadcast": [(3, 1, 1, 6, 8), (1, 4, 2, 9, 8), (3, 1, 2, 9, 5)],
}


@pytest.mark.parametrize("case", list(BROADCASTS))
def test_size_one_batch_and_head_dims_broadcast_like_torch(case):
    (out, grads), (expected, expected_grads) = run_both(BROADCASTS[case])
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_broadcast_with_grouped_query_attention_and_masks():
    # Key/value batch 1 under GQA, with a bool mask and a bias: against torch on the same inputs.
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    bias = torch.randn(8, 5, 7, generator=gen, dtype=torch.float64)
    (out, grads), (expected, expected_grads) = run_both([(2, 8, 5, 16), (1, 2, 7, 16), (1, 2, 7, 16)],
                                                        attn_mask=mask & (bias > -1), enable_gqa=True)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_broadcast_inputs_are_read_in_place_not_copied():
    # A key/value of batch 1 broadcast against a query of batch 64: a copy of K would allocate 64 x its size.
    q = torch.randn(64, 4, 1, 64)
    k, v = torch.randn(1, 4, 4096, 64), torch.randn(1, 4, 4096, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        out = mha_ext.scaled_dot_product_attention(q, k, v)
    allocated = sum(event.cpu_memory_usage for event in profile.key_averages() if event.cpu_memory_usage > 0)
    assert allocated < k.numel() * k.element_size(), allocated  # far less than one K, let alone 64
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shapes", [
    [(2, 0, 5, 16), (2, 0, 7, 16), (2, 0, 7, 16)],   # no heads
    [(2, 4, 5, 16), (2, 4, 7, 16), (2, 4, 7, 0)],    # value head dim 0: empty output
    [(2, 4, 5, 0), (2, 4, 7, 0), (2, 4, 7, 3)],      # query/key head dim 0: the mean of V
    [(0, 4, 5, 16), (0, 4, 7, 16), (0, 4, 7, 16)],   # no batch
])
def test_empty_dims_give_what_torch_gives(shapes):
    (out, grads), (expected, expected_grads) = run_both(shapes)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.shape == expected_grad.shape
        torch.testing.assert_close(grad, expected_grad)


def test_empty_query_key_dim_attends_by_the_masks_alone():
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0), torch.randn(2, 3, 7, 4, generator=gen)
    mask = torch.rand(5, 7, generator=gen) > 0.4
    mask[:, 0] = True
    out, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(lse, mask.sum(-1).log().expand(2, 3, 5))
    _, lse_without_values = mha_ext.scaled_dot_product_attention(q, k, v[..., :0], attn_mask=mask, return_lse=True)
    torch.testing.assert_close(lse_without_values, lse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_propagate_like_torch(dtype, poison):
    # Garbage in must not look like a clean gradient: the output and the gradients are NaN exactly where
    # torch's are. Against torch's math backend, the definition: its fused CPU kernel (float32 only) drops
    # the NaN of a NaN query from the output, while keeping it in the gradients.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 8, generator=gen).to(dtype)
    q[0, 1, 2, 3] = poison
    k, v = torch.randn(1, 2, 6, 8, generator=gen).to(dtype), torch.randn(1, 2, 6, 8, generator=gen).to(dtype)
    results = []
    for attend in (mha_ext.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = attend(*leaves)
        results.append([out.isnan()] + [g.isnan() for g in torch.autograd.grad(out.sum(), leaves)])
    assert any(nans.any() for nans in results[1])  # the case poisons something
    for ours, torchs in zip(*results):
        assert torch.equal(ours, torchs)


def test_fully_masked_rows_stay_zero_next_to_a_poisoned_row():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    q[0, 0, 1, 0] = float("inf")
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[3] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mha_ext.scaled_dot_product_attention(*leaves, attn_mask=mask)
    grad_q = torch.autograd.grad(out.sum(), leaves)[0]
    assert out[0, 0, 1].isnan().all() and (out[0, 0, 3] == 0).all()
    assert grad_q[0, 0, 1].isnan().all() and (grad_q[0, 0, 3] == 0).all()


@pytest.mark.parametrize("batch_first", [True, False])
def test_layer_runs_a_bias_of_another_dtype_like_torch(batch_first):
    # torch runs a float16 in_proj_bias on float64 inputs (its matmul-then-add path, batch_first=True);
    # mha_ext's layer adds the bias in the weights' dtype, in both layouts.
    torch.manual_seed(0)
    ours = mha_ext.nn.MultiheadAttention(16, 2, batch_first=batch_first, dtype=torch.float64)
    ours.in_proj_bias.data = ours.in_proj_bias.data.half()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, weights = ours(x, x, x)
    assert out.dtype == torch.float64
    if batch_first:
        reference = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
        reference.load_state_dict(ours.state_dict())
        expected, expected_weights = reference(x, x, x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(weights, expected_weights)


@pytest.mark.parametrize("make_call,pattern", [
    (lambda layer, x: layer(x, x[..., :8], x), r"key must have 16 features \(kdim\), got shape \(5, 2, 8\)"),
    (lambda layer, x: layer(x, x, x, key_padding_mask=torch.ones(3, 3, dtype=torch.bool)),
     r"key_padding_mask must have shape \(2, 5\) \(N, S\), got \(3, 3\)"),
    (lambda layer, x: layer(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.int32)),
     r"attn_mask must be a bool or floating tensor, got dtype torch.int32"),
    (lambda layer, x: layer(x, x, x, is_causal=True), r"is_causal=True needs attn_mask"),
])
def test_layer_errors_are_caught_as_torch_code_expects(make_call, pattern):
    # torch's layer raises AssertionError (or RuntimeError); mha_ext's raises one class that is all of these.
    layer = mha_ext.nn.MultiheadAttention(16, 2)
    x = torch.randn(5, 2, 16)
    for expected in (AssertionError, RuntimeError, (ValueError, TypeError)):
        with pytest.raises(expected, match=pattern) as caught:
            make_call(layer, x)
        assert isinstance(caught.value, (mha_ext.errors.LayerValueError, mha_ext.errors.LayerTypeError))
