"""The Python side of the torch ops: autograd formulas and fake (meta) kernels for
torch.ops.mha_ext.attention_forward / attention_backward / attention_weights / attention_dropout_mask and
varlen_attention_forward / varlen_attention_backward,
so the ops work with autograd and trace under torch.compile(fullgraph=True) without graph breaks."""

from __future__ import annotations

import torch

_ops = torch.ops.mha_ext


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _leading_shape(query, key, value) -> tuple:
    """The outputs' leading dims (before L): query's, key's and value's broadcast as in torch, the heads
    being query's, or key/value's where the query has one (the op's contract, csrc/attention/contract.cpp)."""
    rank = max(query.dim(), key.dim(), value.dim())
    if rank < 3:
        return ()
    q, k, v = (tuple(t.shape[:-2]) for t in (query, key, value))
    batch = torch.broadcast_shapes(q[:-1], k[:-1], v[:-1])
    query_heads = q[-1] if q else 1
    kv_heads = torch.broadcast_shapes(k[-1:], v[-1:])
    heads = query_heads if query_heads != 1 or not kv_heads else kv_heads[0]
    return tuple(batch) + (heads,)


# The fake kernels and the autograd formula read the first arguments of the forward (query, key, value,
# attn_mask, attn_bias) by name and pass the others on as they came, so that an argument added to the
# forward's schema (and to the backward's, which repeats it) needs nothing here.
@torch.library.register_fake("mha_ext::attention_forward")
def _attention_forward_fake(query, key, value, *rest):
    lead = _leading_shape(query, key, value)
    L = query.shape[-2]
    out = query.new_empty(lead + (L, value.shape[-1]))
    lse = query.new_empty(lead + (L,), dtype=_accumulation_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("mha_ext::attention_backward")
def _attention_backward_fake(grad_output, output, lse, grad_lse, mask_requires_grad, bias_requires_grad, query,
                             key, value, attn_mask, attn_bias, *rest):
    def grad_like(tensor, wanted):
        return tensor.new_empty(tensor.shape) if wanted else query.new_empty((0,))

    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            grad_like(attn_mask, mask_requires_grad), grad_like(attn_bias, bias_requires_grad))


def _packed_heads(query, key, value) -> int:
    """The varlen output's heads (csrc/attention/varlen.cpp): the query's, or key/value's where it has one."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 3:
            raise ValueError(f"mha_ext: {name} must be packed as (total_tokens, heads, head_dim) (3 dims), "
                             f"got shape {tuple(tensor.shape)}")
    return query.shape[1] if query.shape[1] != 1 else max(key.shape[1], value.shape[1])


@torch.library.register_fake("mha_ext::varlen_attention_forward")
def _varlen_attention_forward_fake(query, key, value, *rest):
    heads = _packed_heads(query, key, value)
    out = query.new_empty((query.shape[0], heads, value.shape[-1]))
    lse = query.new_empty((heads, query.shape[0]), dtype=_accumulation_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("mha_ext::varlen_attention_backward")
def _varlen_attention_backward_fake(grad_output, output, lse, grad_lse, mask_requires_grad, bias_requires_grad,
                                    query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    attn_mask, attn_bias, *rest):
    return _attention_backward_fake(grad_output, output, lse, grad_lse, mask_requires_grad, bias_requires_grad,
                                    query, key, value, attn_mask, attn_bias)


@torch.library.register_fake("mha_ext::attention_dropout_mask")
def _attention_dropout_mask_fake(query, key, dropout_p, rng_state):
    scores = _leading_shape(query, key, key) + (query.shape[-2], key.shape[-2])
    return query.new_empty(scores, dtype=torch.bool)


@torch.library.register_fake("mha_ext::attention_weights")
def _attention_weights_fake(query, key, attn_mask, attn_bias, lse, causal, scale):
    return query.new_empty(_leading_shape(query, key, key) + (query.shape[-2], key.shape[-2]))


def _forward_setup_context(ctx, inputs, output):
    # Every argument of the forward goes back to the backward op (rng_state included, so that it
    # regenerates the forward's dropout decisions): the tensors saved, the others kept as they are.
    ctx.tensor_slots = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]
    ctx.save_for_backward(*output, *(inputs[i] for i in ctx.tensor_slots))


def _backward_formula(backward_op, mask_slot: int):
    """The autograd formula of a forward op whose backward op takes (grad_output, output, lse, grad_lse,
    mask_requires_grad, bias_requires_grad, *the forward's arguments) and returns the gradients of query, key,
    value, attn_mask and attn_bias; attn_mask and attn_bias are the forward's arguments mask_slot and
    mask_slot + 1."""
    def backward(ctx, grad_out, grad_lse):
        out, lse, *tensors = ctx.saved_tensors
        inputs = list(ctx.inputs)
        for slot, tensor in zip(ctx.tensor_slots, tensors):
            inputs[slot] = tensor
        attn_mask, attn_bias = inputs[mask_slot], inputs[mask_slot + 1]
        needs = ctx.needs_input_grad
        mask_requires_grad = bool(needs[mask_slot]) and attn_mask is not None and attn_mask.is_floating_point()
        bias_requires_grad = bool(needs[mask_slot + 1]) and attn_bias is not None
        grad_q, grad_k, grad_v, grad_mask, grad_bias = backward_op(
            grad_out, out, lse, grad_lse, mask_requires_grad, bias_requires_grad, *inputs)
        grads = [grad_q, grad_k, grad_v] + [None] * (len(inputs) - 3)
        grads[mask_slot] = grad_mask if mask_requires_grad else None
        grads[mask_slot + 1] = grad_bias if bias_requires_grad else None
        return tuple(grads)

    return backward


torch.library.register_autograd("mha_ext::attention_forward", _backward_formula(_ops.attention_backward, 3),
                                setup_context=_forward_setup_context)
torch.library.register_autograd("mha_ext::varlen_attention_forward",
                                _backward_formula(_ops.varlen_attention_backward, 7),
                                setup_context=_forward_setup_context)


def _weights_backward(ctx, grad):
    raise NotImplementedError(
        "mha_ext.attention_weights is not differentiable; compute gradients through "
        "mha_ext.scaled_dot_product_attention instead")


torch.library.register_autograd("mha_ext::attention_weights", _weights_backward,
                                setup_context=lambda ctx, inputs, output: None)
