"""The functional API: a drop-in for torch.nn.functional.scaled_dot_product_attention, and the
attention weights recomputed by the fused kernels.

Mask convention (the same as torch's SDPA): a **bool** ``attn_mask`` is True where a query may attend a
key; a **floating** ``attn_mask`` or ``attn_bias`` is added to the scaled scores (use -inf to block).
nn.MultiheadAttention's True = *ignore* masks, BERT/Hugging Face 1/0 int masks and the TensorFlow
tutorial's 1 = masked float masks convert with the helpers in mha_ext.masks.
"""

from __future__ import annotations

import torch

from ._checks import (
    causal_alignment,
    check_dropout_p,
    require_optional_tensor,
    require_tensor,
    resolve_scale,
    run_op,
)
from ._loader import build_info
from .errors import AttentionValueError

_ops = torch.ops.mha_ext


def _heads(tensor: torch.Tensor) -> int:
    return tensor.size(-3) if tensor.dim() >= 3 else 1


def _check_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> None:
    # Equal head counts and one head against many broadcast, as in torch; other multiples are grouped-query
    # attention, which torch (and so mha_ext) runs only when asked to.
    kv_heads = _heads(key) if _heads(key) != 1 else _heads(value)
    query_heads = _heads(query)
    if query_heads != kv_heads and 1 not in (query_heads, kv_heads) and not enable_gqa:
        raise AttentionValueError(
            f"mha_ext: query has {query_heads} heads (dim -3) but key/value have {kv_heads}; "
            "pass enable_gqa=True for grouped-query attention")


def _check_devices(query: torch.Tensor, **others) -> None:
    # Checked here too: with tensors on two devices the dispatcher may pick a kernel before the
    # op's own check can run (e.g. the fake kernel for a meta tensor).
    for name, tensor in others.items():
        if tensor is not None and tensor.device != query.device:
            raise AttentionValueError(
                f"mha_ext: {name} must be on the query's device {query.device}, got {tensor.device}")
    if query.device.type == "cuda":
        if not build_info()["cuda"]:
            raise RuntimeError(
                "mha_ext: query is a CUDA tensor but this build of mha_ext has no CUDA kernels; "
                "rebuild with a CUDA torch and toolkit (or MHA_EXT_FORCE_CUDA=1)")


def _draw_rng_state(device: torch.device, generator) -> torch.Tensor:
    """A fresh [seed, offset] for one call's dropout, from `generator` or the default generator of
    `device`: torch.manual_seed makes runs reproducible, and consecutive calls differ."""
    if generator is not None:
        device = generator.device
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, attn_bias=None, return_lse=False, generator=None):
    """softmax(query @ key^T * scale + masks) @ value, fused (no L x S matrix in memory).

    Same arguments and results as torch.nn.functional.scaled_dot_product_attention, plus ``attn_bias``,
    ``return_lse``, ``generator`` and bottom-right causality (``is_causal="lower_right"``).

    Args:
        query: (..., Hq, L, E). Any number of leading batch dims; (L, E) and (B, L, E) work too.
        key: (..., Hkv, S, E).
        value: (..., Hkv, S, Ev); Ev may differ from E. Leading dims of query, key and value broadcast as in
            torch (a size-1 batch or head dim against any size, read with stride 0, never copied); the
            output has the broadcast leading dims. E = 0 gives softmax(masks) @ value, Ev = 0 an empty output.
        attn_mask: bool, **True = takes part in attention** (torch SDPA convention), or floating, added to
            the scaled scores. Broadcastable to (..., H, L, S); broadcast dims are read with stride 0.
            A floating mask that requires grad gets its gradient (summed to its own shape). torch's
            ``causal_upper_left(L, S)`` / ``causal_lower_right(L, S)`` (CausalBias) run as causal attention.
        dropout_p: attention dropout, as torch's: each (query, key) probability is dropped with probability
            dropout_p and the kept ones are scaled by 1 / (1 - dropout_p), inside the fused kernels. The
            decisions come from a counter-based RNG (Philox) keyed by a seed and offset drawn from
            ``generator`` (default: the device's default generator, so ``torch.manual_seed`` makes runs
            reproducible); they do not depend on tiling, thread count or device. ``mha_ext.dropout_mask``
            returns the decisions a call would make. Applied whenever dropout_p > 0 (no training flag, as torch).
        is_causal: ``True`` or ``"upper_left"``: query row i attends key columns j <= i (top-left aligned,
            as torch). ``"lower_right"``: j <= i + S - L, aligned to the bottom-right corner so that the last
            query attends every key (decoding and chunked prefill with a KV cache, L < S). torch's
            ``CausalVariant`` values work too. May be combined with attn_mask and attn_bias.
        scale: multiplies query @ key^T; default 1/sqrt(E). Must be finite.
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention); K/V are never repeated.
        attn_bias: floating tensor added to the scores, broadcast like attn_mask and usable together with
            a bool attn_mask (e.g. padding + relative-position bias). Gets a gradient when it requires grad.
        return_lse: also return each row's log-sum-exp, shape (..., H, L), float32 (float64 for
            float64 inputs), -inf for rows with nothing to attend (computed before dropout).
        generator: the torch.Generator dropout draws its seed and offset from.

    Jagged nested tensors (``torch.nested``, ``layout=torch.jagged``, ``(B, H, j, D)`` as torch's SDPA takes
    them) run on the varlen kernels (mha_ext.varlen_attention), without padding: each sequence attends to its
    own keys, ``is_causal`` per sequence (torch refuses causal nested calls); masks are refused, as torch does.

    A query row with nothing left to attend to yields 0 (and zero gradients), never NaN; a NaN or inf among
    a row's scores makes its output, LSE and gradients NaN, as in torch.
    dtypes: float32, float64, bfloat16, float16 (accumulating in float32). A floating mask or bias has the
    query's dtype or float32. Inputs with a non-unit stride in their last dim are copied; every other
    stride pattern is read in place. Bad arguments raise mha_ext.errors.AttentionValueError /
    AttentionTypeError, which are also RuntimeErrors, as torch's SDPA raises.
    """
    require_tensor("query", query)
    require_tensor("key", key)
    require_tensor("value", value)
    require_optional_tensor("attn_mask", attn_mask)
    require_optional_tensor("attn_bias", attn_bias)
    if query.is_nested:
        from ._jagged import jagged_attention  # imports varlen, which imports this module

        return jagged_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attn_bias,
                                return_lse, generator)
    dropout_p = check_dropout_p(dropout_p)
    scale = resolve_scale(scale, query.size(-1) if query.dim() else 0)
    causal, attn_mask = causal_alignment(is_causal, attn_mask, query, key)
    _check_heads(query, key, value, enable_gqa)
    _check_devices(query, key=key, value=value, attn_mask=attn_mask, attn_bias=attn_bias)
    rng_state = _draw_rng_state(query.device, generator) if dropout_p > 0.0 else None
    out, lse = run_op(_ops.attention_forward, query, key, value, attn_mask, attn_bias, causal, scale, dropout_p,
                      rng_state)
    return (out, lse) if return_lse else out


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, attn_bias=None,
                      lse=None):
    """The attention probabilities softmax(query @ key^T * scale + masks), shape (..., H, L, S), in the
    query's dtype, recomputed tile by tile by the fused kernels from the log-sum-exp.

    Masks and ``is_causal`` follow scaled_dot_product_attention's conventions (bool True = attend; floating
    added; True / "upper_left" or "lower_right"). Pass the ``lse`` returned by
    ``scaled_dot_product_attention(..., return_lse=True)`` to skip recomputing it. Rows with nothing to
    attend are all 0. Materialises the L x S matrix (that is what it returns) and is not differentiable.
    """
    require_tensor("query", query)
    require_tensor("key", key)
    require_optional_tensor("attn_mask", attn_mask)
    require_optional_tensor("attn_bias", attn_bias)
    require_optional_tensor("lse", lse)
    scale = resolve_scale(scale, query.size(-1) if query.dim() else 0)
    causal, attn_mask = causal_alignment(is_causal, attn_mask, query, key)
    _check_heads(query, key, key, enable_gqa)
    _check_devices(query, key=key, attn_mask=attn_mask, attn_bias=attn_bias, lse=lse)
    if lse is None:
        # The values do not matter for the LSE: a one-column value keeps that pass cheap.
        value = key.new_zeros(()).expand(*key.shape[:-1], 1)
        _, lse = run_op(_ops.attention_forward, query, key, value, attn_mask, attn_bias, causal, scale)
    return run_op(_ops.attention_weights, query, key, attn_mask, attn_bias, lse, causal, scale)


def dropout_mask(query, key, dropout_p, *, generator=None, rng_state=None, enable_gqa=False):
    """The dropout decisions ``scaled_dot_product_attention(query, key, ..., dropout_p=dropout_p,
    generator=generator)`` makes: bool (..., H, L, S), **True = kept** (scaled by 1 / (1 - dropout_p)),
    False = dropped. Like that call, it draws the seed and offset from ``generator`` (default: the
    device's default generator), so restoring the generator's state before each of the two calls gives
    the mask the attention call used. Pass ``rng_state`` (int64 [seed, offset]) to give them directly, or
    [seed, offset, row_offset, column_offset, head_offset, total_heads] for the decisions that a larger call
    (with total_heads query heads) makes for these rows, columns and heads at those offsets: how
    mha_ext.distributed reproduces a single-device call's dropout on each rank's slice.
    """
    require_tensor("query", query)
    require_tensor("key", key)
    dropout_p = check_dropout_p(dropout_p)
    _check_heads(query, key, key, enable_gqa)
    _check_devices(query, key=key)
    if rng_state is None:
        rng_state = _draw_rng_state(query.device, generator) if dropout_p > 0.0 else torch.zeros(2, dtype=torch.int64)
    return run_op(_ops.attention_dropout_mask, query, key, dropout_p, rng_state)
