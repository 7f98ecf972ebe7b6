"""The torch-op face: opcheck on every op, torch.compile without graph breaks, schema-level behaviour."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.reference import DEVICES, assert_close_to_reference, reference_attention

ops = torch.ops.mha_ext


def sample_inputs(device, dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    k = torch.randn(2, 2, 11, 8, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    v = torch.randn(2, 2, 11, 6, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    mask = (torch.rand(2, 1, 9, 11, generator=gen) > 0.3).to(device)
    bias = torch.randn(4, 1, 11, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    return q, k, v, mask, bias


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention_forward(device, dtype):
    q, k, v, mask, bias = sample_inputs(device, dtype)
    for args in [(q, k, v, None, None, "none", 0.3), (q, k, v, mask, bias, "upper_left", 0.5), (q, k, v, bias, None, "none", 1.0)]:
        torch.library.opcheck(ops.attention_forward, args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_dropout(device):
    q, k, v, mask, bias = sample_inputs(device, torch.float64)
    rng_state = torch.tensor([3, 4], dtype=torch.int64)
    torch.library.opcheck(ops.attention_forward, (q, k, v, mask, bias, "upper_left", 0.5, 0.3, rng_state))
    torch.library.opcheck(ops.attention_dropout_mask, (q, k, 0.3, rng_state))
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))  # the backward op itself has no autograd formula
    out, lse = ops.attention_forward(q, k, v, mask, bias, "upper_left", 0.5, 0.3, rng_state)
    torch.library.opcheck(ops.attention_backward, (torch.randn_like(out), out, lse, None, False, True, q, k, v, mask,
                                                   bias, "upper_left", 0.5, 0.3, rng_state))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_backward_and_weights(device):
    q, k, v, mask, bias = sample_inputs(device, torch.float64, requires_grad=False)
    out, lse = ops.attention_forward(q, k, v, mask, bias, "upper_left", 0.5)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    torch.library.opcheck(ops.attention_backward, (grad_out, out, lse, None, False, True, q, k, v, mask, bias, "upper_left", 0.5))
    torch.library.opcheck(ops.attention_backward, (grad_out, out, lse, grad_lse, False, False, q, k, v, mask, bias, "upper_left", 0.5))
    torch.library.opcheck(ops.attention_weights, (q, k, mask, bias, lse, "upper_left", 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device):
    q, k, v, mask, bias = sample_inputs(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v, mask, bias):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                                    enable_gqa=True).sum()

    compiled = attend(q, k, v, mask, bias)
    compiled.backward()
    compiled_grads = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    eager = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                                 enable_gqa=True).sum()
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, (q.grad, k.grad, v.grad, bias.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_torch_compile_inductor_has_no_graph_break():
    q, k, v, mask, _ = sample_inputs("cpu", requires_grad=False)
    explanation = torch._dynamo.explain(
        lambda q, k, v: mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))(q, k, v)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_bitwise_deterministic(device):
    q, k, v, mask, bias = sample_inputs(device, requires_grad=False)
    first = ops.attention_forward(q, k, v, mask, bias, "upper_left", 0.4)
    for _ in range(3):
        again = ops.attention_forward(q, k, v, mask, bias, "upper_left", 0.4)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("device", DEVICES)
def test_weights_are_not_differentiable(device):
    q, k, _, mask, _ = sample_inputs(device)
    weights = mha_ext.attention_weights(q, k, attn_mask=mask, enable_gqa=True)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        weights.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scale_default_and_explicit(dtype):
    """Default, small, large and negative scales. Unmasked bf16 scores are scaled inside the exponentials'
    pass where the scale is positive (its row maximum taken before scaling), elsewhere in a pass of their own;
    scores in the hundreds overflow exp unless the row maximum is the one of the scaled scores."""
    q, k, v, _, _ = sample_inputs("cpu", dtype, requires_grad=False)
    for scale in (None, 0.1, 2.0, -0.7):
        for q_in in (q, (q.double() * 60).to(dtype)):
            out = mha_ext.scaled_dot_product_attention(q_in, k, v, scale=scale, enable_gqa=True)
            assert_close_to_reference(out, reference_attention(q_in, k, v, scale=scale), dtype)
