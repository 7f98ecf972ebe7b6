"""Variable-length (packed) attention: no compute on padding.

The sequences of a batch are laid end to end, FlashAttention's varlen layout: ``query`` ``(total_q, Hq, E)``,
``key`` ``(total_k, Hkv, E)``, ``value`` ``(total_k, Hkv, Ev)``, and sequence ``n`` is rows
``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` of the query and ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]`` of key and
value. Work and memory follow ``sum(L_n * S_n)``, never ``(sum L_n) ** 2`` or ``batch * max_len ** 2``.

    cu = mha_ext.varlen.cu_seqlens(torch.tensor([5, 1, 12]))          # tensor([0, 5, 6, 18])
    out = mha_ext.varlen_attention(q, k, v, cu, cu, 12, 12, is_causal=True)

``pack`` / ``unpack`` convert a padded batch (and its 1 = token, 0 = padding mask, BERT / Hugging Face's
convention) to the packed layout and back.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import CausalBias

from ._checks import causal_alignment, check_dropout_p, require_optional_tensor, require_tensor, resolve_scale, run_op
from .errors import AttentionTypeError, AttentionValueError
from .functional import _check_devices, _draw_rng_state

__all__ = ["varlen_attention", "cu_seqlens", "pack", "unpack"]

_ops = torch.ops.mha_ext


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """The offsets ``[0, L_0, L_0 + L_1, ...]`` (int32, on the lengths' device) of sequences of these lengths."""
    require_tensor("lengths", lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise AttentionValueError(
            f"mha_ext: lengths must be a 1-D integer tensor, got {lengths.dtype} of shape {tuple(lengths.shape)}")
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def pack(padded: torch.Tensor, attention_mask: torch.Tensor):
    """``(packed, cu_seqlens, max_seqlen)`` from a padded batch ``(B, L, ...)`` and its ``(B, L)`` mask, which is
    **1 / True = token, 0 / False = padding** (BERT / Hugging Face's convention). ``packed`` is ``(total, ...)``,
    the tokens in batch order; a sequence's tokens need not be contiguous in the padded row (left padding works).
    Differentiable: gradients flow back to the tokens of ``padded``."""
    require_tensor("padded", padded)
    require_tensor("attention_mask", attention_mask)
    if padded.dim() < 2 or attention_mask.shape != padded.shape[:2]:
        raise AttentionValueError(
            f"mha_ext: attention_mask must have shape (B, L) = {tuple(padded.shape[:2])} of padded "
            f"{tuple(padded.shape)}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.to(torch.bool)
    lengths = keep.sum(1)
    return padded[keep], cu_seqlens(lengths).to(padded.device), int(lengths.max()) if lengths.numel() else 0


def unpack(packed: torch.Tensor, attention_mask: torch.Tensor, padding_value: float = 0.0) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(B, L, ...)`` with ``packed``'s tokens where ``attention_mask`` is 1 / True
    and ``padding_value`` elsewhere. Differentiable."""
    require_tensor("packed", packed)
    require_tensor("attention_mask", attention_mask)
    keep = attention_mask.to(torch.bool)
    tokens = int(keep.sum())
    if packed.dim() < 1 or packed.shape[0] != tokens:
        raise AttentionValueError(
            f"mha_ext: packed must hold the {tokens} tokens attention_mask marks (dim 0), got shape "
            f"{tuple(packed.shape)}")
    padded = packed.new_full(tuple(keep.shape) + tuple(packed.shape[1:]), padding_value)
    return padded.index_put((keep,), packed)


def _check_packed_heads(query, key, value, enable_gqa: bool) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 3:
            raise AttentionValueError(
                f"mha_ext: {name} must be packed as (total_tokens, heads, head_dim) (3 dims), got shape "
                f"{tuple(tensor.shape)}")
    query_heads, kv_heads = query.shape[1], key.shape[1]
    if query_heads != kv_heads and 1 not in (query_heads, kv_heads) and not enable_gqa:
        raise AttentionValueError(
            f"mha_ext: query has {query_heads} heads (dim 1) but key/value have {kv_heads}; "
            "pass enable_gqa=True for grouped-query attention")


def _max_seqlen(name: str, value, offsets: torch.Tensor) -> int:
    if value is None:
        return int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise AttentionTypeError(f"mha_ext: {name} must be an int or None, got {type(value).__name__} {value!r}")
    return value


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     attn_mask=None, attn_bias=None, is_causal=False, scale=None, dropout_p=0.0, enable_gqa=False,
                     return_lse=False, generator=None):
    """Attention over packed sequences of different lengths, each sequence attending only to itself.

    Args:
        query: ``(total_q, Hq, E)``, the sequences' queries end to end.
        key: ``(total_k, Hkv, E)``; value: ``(total_k, Hkv, Ev)`` (Ev may differ from E).
        cu_seqlens_q, cu_seqlens_k: int32 / int64 offsets ``(batch + 1,)``, starting at 0, non-decreasing,
            ending at total_q / total_k (:func:`cu_seqlens` makes them from lengths). A sequence may be
            empty; query and key lengths may differ per sequence (cross-attention, a KV cache).
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (None: computed, reading the offsets);
            also the padded layout's sizes for attn_mask and attn_bias.
        attn_mask: bool, **True = takes part in attention** (torch SDPA's convention), or floating, added to
            the scaled scores; attn_bias: floating, added, usable together with a bool attn_mask. Both in
            the **padded layout**: broadcastable to ``(batch, H, max_seqlen_q, max_seqlen_k)``, sequence n
            reading ``[n, :, :L_n, :S_n]``. A size-1 batch dim shares one mask or bias across the sequences
            (e.g. a relative-position bias ``(1, H, max_q, max_k)`` or ALiBi), with its gradient summed over
            them; ``(batch, 1, 1, max_k)`` masks keys per sequence. Gradients when they require grad.
        is_causal: per sequence. ``True`` / ``"upper_left"``: row i attends keys j <= i; ``"lower_right"``:
            j <= i + S_n - L_n (the sequence's last query attends all its keys: decoding with a KV cache).
        scale: default 1/sqrt(E). dropout_p, generator: attention dropout as in
            :func:`mha_ext.scaled_dot_product_attention`; the decisions are keyed by packed row and column.
        enable_gqa: allow Hq to be a multiple of Hkv. return_lse: also return the LSE, ``(H, total_q)``.

    Returns ``(total_q, H, Ev)`` (and the LSE). Rows with nothing to attend give 0. Differentiable, and a
    torch op (``torch.ops.mha_ext.varlen_attention_forward``) that traces under ``torch.compile``. On the
    CPU, long sequences run one at a time on all threads and short ones side by side, one thread each; on
    CUDA the offsets are read on the host (one synchronisation) and each sequence is one launch.
    """
    require_tensor("query", query)
    require_tensor("key", key)
    require_tensor("value", value)
    require_tensor("cu_seqlens_q", cu_seqlens_q)
    require_tensor("cu_seqlens_k", cu_seqlens_k)
    require_optional_tensor("attn_mask", attn_mask)
    require_optional_tensor("attn_bias", attn_bias)
    if isinstance(attn_mask, CausalBias):
        raise AttentionTypeError("mha_ext: varlen_attention takes causality as is_causal (per sequence), "
                                 "not as a CausalBias attn_mask")
    dropout_p = check_dropout_p(dropout_p)
    scale = resolve_scale(scale, query.size(-1) if query.dim() else 0)
    causal, _ = causal_alignment(is_causal, None, query, key)
    _check_packed_heads(query, key, value, enable_gqa)
    _check_devices(query, key=key, value=value, attn_mask=attn_mask, attn_bias=attn_bias)
    max_seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    max_seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    rng_state = _draw_rng_state(query.device, generator) if dropout_p > 0.0 else None
    out, lse = run_op(_ops.varlen_attention_forward, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, attn_mask, attn_bias, causal, scale, dropout_p, rng_state)
    return (out, lse) if return_lse else out
