"""Jagged nested tensors (``torch.nested``, ``layout=torch.jagged``) in mha_ext.scaled_dot_product_attention:
the sequences' tokens lie end to end in the nested tensor's values, which is the packed layout the varlen
kernels take, so a nested call runs on them without padding or copies."""

from __future__ import annotations

import torch

from .errors import AttentionTypeError, AttentionValueError
from .varlen import varlen_attention


def _check_jagged(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_nested:
        raise AttentionTypeError(
            f"mha_ext: with a nested query, {name} must be a nested tensor too, got a dense one of shape "
            f"{tuple(tensor.shape)}")
    if tensor.layout != torch.jagged:
        raise AttentionTypeError(
            f"mha_ext: {name} is a nested tensor with layout {tensor.layout}; mha_ext takes layout=torch.jagged "
            "(torch.nested.nested_tensor(..., layout=torch.jagged))")
    if tensor.dim() != 4 or tensor._ragged_idx != 2:
        raise AttentionValueError(
            f"mha_ext: nested {name} must be (B, H, j, D) with the ragged dim 2 (a (B, j, H, D) nested tensor "
            f"transposed, as torch's SDPA takes it), got shape {tuple(tensor.shape)} ragged in dim "
            f"{tensor._ragged_idx}")


def _offsets(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.lengths() is not None:
        raise AttentionValueError("mha_ext: nested tensors with holes (non-contiguous jagged views with lengths) "
                                  "are not supported; make them contiguous first")
    return tensor.offsets()


def _nested_like(values: torch.Tensor, offsets: torch.Tensor, max_seqlen) -> torch.Tensor:
    """(B, H, j, D) nested from packed (total, H, D) values; the same offsets give the same ragged size j."""
    return torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=max_seqlen).transpose(1, 2)


def jagged_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attn_bias, return_lse,
                     generator):
    """scaled_dot_product_attention for jagged nested query, key and value ``(B, H, j, D)``: each sequence
    attends to its own keys, causal per sequence. Masks are refused, as torch refuses them for nested inputs
    (use mha_ext.varlen_attention for a mask or bias in the padded layout). Returns a nested ``(B, H, j, Ev)``
    (and the LSE, nested ``(B, H, j)``)."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _check_jagged(name, tensor)
    for name, mask in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if mask is not None:
            raise AttentionValueError(
                f"mha_ext: {name} is not supported with nested tensors (as in torch); use is_causal, or "
                "mha_ext.varlen_attention with a mask in the padded layout")
    if query.size(0) != key.size(0) or key.size(0) != value.size(0):
        raise AttentionValueError(
            f"mha_ext: query, key and value must hold the same number of sequences, got {query.size(0)}, "
            f"{key.size(0)} and {value.size(0)}")
    offsets_q, offsets_k = _offsets(query), _offsets(key)
    if value.offsets() is not offsets_k and not torch.equal(_offsets(value), offsets_k):
        raise AttentionValueError("mha_ext: nested key and value must have the same sequence lengths")
    def packed(tensor):  # (total, H, D): the values of the (B, j, H, D) view
        return tensor.transpose(1, 2).values()

    result = varlen_attention(
        packed(query), packed(key), packed(value), offsets_q, offsets_k, query._maybe_max_seqlen,
        key._maybe_max_seqlen, is_causal=is_causal, scale=scale, dropout_p=dropout_p, enable_gqa=enable_gqa,
        return_lse=return_lse, generator=generator)
    out, lse = result if return_lse else (result, None)
    out = _nested_like(out, offsets_q, query._maybe_max_seqlen)
    if not return_lse:
        return out
    lse = torch.nested.nested_tensor_from_jagged(lse.t(), offsets_q, max_seqlen=query._maybe_max_seqlen)
    return out, lse.transpose(1, 2)
