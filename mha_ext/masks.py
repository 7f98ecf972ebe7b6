"""Mask helpers: turn the mask conventions users bring into mha_ext's.

mha_ext's convention is that of ``torch.nn.functional.scaled_dot_product_attention``:

* a **bool** ``attn_mask``: ``True`` = the key takes part in attention (attend), ``False`` = masked;
* a **floating** ``attn_mask`` or ``attn_bias``: added to the scaled scores (``0`` = attend, ``-inf`` = masked);
* any shape broadcastable to ``(N, H, L, S)`` (batch, heads, queries, keys). The kernels read masks
  with stride 0 along broadcast dimensions, so the broadcast views returned here cost nothing.

Every helper names the convention it reads in its docstring. Where the input already is in a
usable dtype the result is a view of it (no copy); converting a dtype or inverting a bool mask
allocates one tensor of the input's size, never of the full ``(N, H, L, S)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import require_tensor
from .errors import AttentionTypeError, AttentionValueError

__all__ = [
    "causal",
    "key_padding_from_lengths",
    "from_attention_mask",
    "from_tf_mask",
    "query_key_mask",
    "from_torch_key_padding_mask",
    "from_torch_attn_mask",
    "to_additive",
    "apply_head_mask",
]


def _check_zero_one(name: str, mask: Tensor) -> None:
    # A 0/-10000 additive mask passed where a 0/1 mask is expected would silently mean
    # "attend everywhere"; reject anything that is not 0 or 1.
    if mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise AttentionValueError(
            f"{name} must contain only 0 and 1, got value {mask[bad].flatten()[0].item()!r}"
        )


def _check_bool_or_float(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttentionTypeError(f"{name} must be a bool or floating tensor, got dtype {mask.dtype}")


def causal(L: int, S: int | None = None, *, alignment: str = "upper_left", device=None) -> Tensor:
    """Causal mask, bool ``(L, S)``, mha_ext convention (``True`` = attend).

    ``alignment="upper_left"``: query ``i`` attends key ``j`` iff ``j <= i`` (what ``is_causal=True``
    does, torch's ``causal_upper_left``); ``"lower_right"``: iff ``j <= i + S - L``, so the last query
    attends every key (``is_causal="lower_right"``, torch's ``causal_lower_right``). Passing
    ``is_causal`` to the op is cheaper (nothing is materialised, masked tiles are skipped); use this mask
    when it must be combined with others by hand. ``S`` defaults to ``L``.
    """
    S = L if S is None else S
    for name, n in (("L", L), ("S", S)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise AttentionValueError(f"{name} must be a non-negative int, got {n!r}")
    if alignment not in ("upper_left", "lower_right"):
        raise AttentionValueError(f"alignment must be 'upper_left' or 'lower_right', got {alignment!r}")
    diagonal = S - L if alignment == "lower_right" else 0
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal)


def key_padding_from_lengths(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Key padding mask from sequence lengths, bool ``(N, 1, 1, S)``, mha_ext convention (``True`` = attend).

    ``lengths[n]`` is the number of real (right-padded) tokens of sequence ``n``: keys
    ``j < lengths[n]`` are attended, the padding after them is masked. ``S`` is ``max_len``, or
    ``lengths.max()`` when ``max_len`` is None.
    """
    require_tensor("lengths", lengths)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise AttentionValueError(
            f"lengths must be a 1-D integer tensor (N,), got shape {tuple(lengths.shape)} and dtype {lengths.dtype}"
        )
    if lengths.numel() and bool((lengths < 0).any()):
        raise AttentionValueError(f"lengths must be non-negative, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise AttentionValueError(f"max_len must be at least lengths.max() = {longest}, got {max_len}")
    keep = torch.arange(max_len, device=lengths.device) < lengths[:, None]
    return keep[:, None, None, :]


def from_attention_mask(attention_mask: Tensor) -> Tensor:
    """From BERT's / Hugging Face's ``attention_mask`` (``1`` = attend, ``0`` = masked) to mha_ext's bool mask.

    ``(N, S)`` (one flag per key, as tokenizers return) becomes ``(N, 1, 1, S)``; BERT's 3-D
    ``[batch, from_seq, to_seq]`` mask ``(N, L, S)`` becomes ``(N, 1, L, S)``. Ints, floats or bools
    holding only 0 and 1 are accepted (an additive 0/-10000 "extended" mask is rejected). A bool
    input is returned as a view; other dtypes are converted once, at the input's size.
    """
    require_tensor("attention_mask", attention_mask)
    if attention_mask.dim() not in (2, 3):
        raise AttentionValueError(
            "attention_mask must be (N, S) or (N, L, S) with 1 = attend, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    _check_zero_one("attention_mask", attention_mask)
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return keep.unsqueeze(1) if keep.dim() == 3 else keep[:, None, None, :]


def from_tf_mask(mask: Tensor) -> Tensor:
    """From the TensorFlow tutorial's mask (``1`` = masked, added as ``mask * -1e9``) to mha_ext's bool mask.

    The shape is kept (TensorFlow's masks are already broadcastable to ``(..., L, S)``: padding
    masks ``(N, 1, 1, S)``, look-ahead masks ``(L, S)``). Values must be 0 or 1; a bool input means
    ``True`` = masked too. Masked keys are excluded exactly instead of getting a -1e9 score, which only
    differs for a query with every key masked: TensorFlow then averages all values uniformly,
    mha_ext returns zeros.
    """
    require_tensor("mask", mask)
    _check_zero_one("mask", mask)
    return ~mask if mask.dtype == torch.bool else mask == 0


def query_key_mask(query_mask: Tensor, key_mask: Tensor) -> Tensor:
    """Outer product of per-token masks on both sides (``1`` = keep), bool ``(N, 1, L, S)``, mha_ext convention.

    ``query_mask`` ``(N, L)`` and ``key_mask`` ``(N, S)`` hold 1 (or True) for real tokens and 0
    for masked ones; query ``i`` attends key ``j`` iff both are kept, as in
    ``torch.bmm(query_mask.unsqueeze(-1), key_mask.unsqueeze(1))`` with ``0`` = masked. Unlike that
    formulation (whose masked query rows come out NaN after the softmax), a masked query gets an
    output of zeros. The result is one ``(N, 1, L, S)`` bool tensor: an outer product cannot be a
    view of its factors.
    """
    require_tensor("query_mask", query_mask)
    require_tensor("key_mask", key_mask)
    if query_mask.dim() != 2 or key_mask.dim() != 2 or query_mask.shape[0] != key_mask.shape[0]:
        raise AttentionValueError(
            "query_mask must be (N, L) and key_mask (N, S) with the same N, got shapes "
            f"{tuple(query_mask.shape)} and {tuple(key_mask.shape)}"
        )
    _check_zero_one("query_mask", query_mask)
    _check_zero_one("key_mask", key_mask)
    return (query_mask != 0)[:, None, :, None] & (key_mask != 0)[:, None, None, :]


def from_torch_key_padding_mask(key_padding_mask: Tensor) -> Tensor:
    """From ``nn.MultiheadAttention``'s ``key_padding_mask`` to an mha_ext mask, ``(N, S)`` -> ``(N, 1, 1, S)``.

    torch's convention: bool ``True`` = ignore this key (padding); a floating mask is added to the
    scores. A bool mask is inverted (one ``(N, S)`` allocation) to mha_ext's ``True`` = attend; a
    floating mask keeps its meaning and is returned as a view. An unbatched ``(S,)`` mask becomes
    ``(1, 1, S)``.
    """
    require_tensor("key_padding_mask", key_padding_mask)
    _check_bool_or_float("key_padding_mask", key_padding_mask)
    if key_padding_mask.dim() not in (1, 2):
        raise AttentionValueError(
            f"key_padding_mask must be (N, S) or unbatched (S,), got shape {tuple(key_padding_mask.shape)}"
        )
    mask = key_padding_mask.unsqueeze(-2).unsqueeze(-2)
    return mask if mask.is_floating_point() else ~mask


def from_torch_attn_mask(attn_mask: Tensor, num_heads: int) -> Tensor:
    """From ``nn.MultiheadAttention``'s ``attn_mask`` to an mha_ext mask.

    torch's convention: bool ``True`` = this query may not attend this key; a floating mask is
    added to the scores. Shape ``(L, S)`` (shared by every batch and head) is kept; the per-head
    ``(N * num_heads, L, S)`` becomes a view ``(N, num_heads, L, S)``. A bool mask is inverted (one
    allocation of the input's size) to mha_ext's ``True`` = attend; a floating mask is not copied.
    """
    require_tensor("attn_mask", attn_mask)
    _check_bool_or_float("attn_mask", attn_mask)
    if attn_mask.dim() == 3:
        if attn_mask.shape[0] % num_heads:
            raise AttentionValueError(
                f"a 3-D attn_mask must be (N * num_heads, L, S) with num_heads={num_heads}, "
                f"got shape {tuple(attn_mask.shape)}"
            )
        attn_mask = attn_mask.unflatten(0, (-1, num_heads))
    elif attn_mask.dim() != 2:
        raise AttentionValueError(
            f"attn_mask must be (L, S) or (N * num_heads, L, S), got shape {tuple(attn_mask.shape)}"
        )
    return attn_mask if attn_mask.is_floating_point() else ~attn_mask


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """mha_ext bool mask (``True`` = attend) to the equivalent additive mask: ``0`` = attend, ``-inf`` = masked.

    Same shape (so broadcast masks stay small). Use it to pass a second bool mask as ``attn_bias``
    next to a bool ``attn_mask``.
    """
    require_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise AttentionTypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def apply_head_mask(attn_output: Tensor, head_mask: Tensor) -> Tensor:
    """Apply a ``head_mask`` (per-head multiplicative weights, ``1`` = keep, ``0`` = drop the head).

    Hugging Face multiplies each head's attention probabilities by ``head_mask[h]``; since
    ``(w * p) @ v == w * (p @ v)``, that is a per-head scale of the attention output, applied here
    to mha_ext's output ``(..., H, L, Ev)``. ``head_mask`` is ``(H,)`` (same for every batch) or
    ``(N, H)``; it is viewed as ``(H, 1, 1)`` / ``(N, H, 1, 1)`` (no copy) and broadcast.
    """
    require_tensor("attn_output", attn_output)
    require_tensor("head_mask", head_mask)
    if attn_output.dim() < 3:
        raise AttentionValueError(f"attn_output must be (..., H, L, Ev), got shape {tuple(attn_output.shape)}")
    heads = attn_output.shape[-3]
    if head_mask.dim() not in (1, 2) or head_mask.shape[-1] != heads:
        raise AttentionValueError(
            f"head_mask must be (H,) or (N, H) with H = {heads} (attn_output's head dimension), "
            f"got shape {tuple(head_mask.shape)}"
        )
    return attn_output * head_mask[..., None, None]
