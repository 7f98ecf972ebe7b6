"""Argument checks and conversions shared by the Python layer, so every entry point words its errors
alike and raises mha_ext's exceptions (mha_ext.errors): catchable as ValueError / TypeError and, like
torch's, as RuntimeError."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from .errors import AttentionTypeError, AttentionValueError

# What the ops' `causal` argument takes; is_causal=True is "upper_left", as torch's.
CAUSAL_ALIGNMENTS = ("upper_left", "lower_right")


def require_tensor(name: str, value) -> None:
    """AttentionTypeError naming the argument unless `value` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise AttentionTypeError(f"mha_ext: {name} must be a torch.Tensor, got {type(value).__name__}")


def require_optional_tensor(name: str, value) -> None:
    if value is not None:
        require_tensor(name, value)


def run_op(op, *args):
    """Calls one of the mha_ext ops, re-raising its ValueError / TypeError (torch's, for a bad argument) as
    mha_ext's exceptions with the same message."""
    try:
        return op(*args)
    except (AttentionValueError, AttentionTypeError):
        raise
    except ValueError as error:
        raise AttentionValueError(str(error)) from None
    except TypeError as error:
        raise AttentionTypeError(str(error)) from None


def _real(name: str, value, expected: str) -> float:
    """float(value), or AttentionTypeError naming the argument (strings and bools are refused, as torch does)."""
    if not isinstance(value, (str, bytes, bool)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise AttentionTypeError(f"mha_ext: {name} must be {expected}, got {type(value).__name__} {value!r}")


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: `scale` itself (a finite real number), or 1/sqrt(head_dim) for None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scale = _real("scale", scale, "a float or None")
    if not math.isfinite(scale):
        raise AttentionValueError(f"mha_ext: scale must be finite, got {scale}")
    return scale


def check_dropout_p(dropout_p) -> float:
    dropout_p = _real("dropout_p", dropout_p, "a float in [0, 1]")
    if not 0.0 <= dropout_p <= 1.0:
        raise AttentionValueError(f"mha_ext: dropout_p must be in [0, 1], got {dropout_p}")
    return dropout_p


def _alignment_of(is_causal) -> str:
    if isinstance(is_causal, CausalVariant):
        return "upper_left" if is_causal == CausalVariant.UPPER_LEFT else "lower_right"
    if isinstance(is_causal, str):
        if is_causal not in CAUSAL_ALIGNMENTS:
            raise AttentionValueError(
                f"mha_ext: is_causal must be a bool, 'upper_left' or 'lower_right', got {is_causal!r}")
        return is_causal
    return "upper_left" if is_causal else "none"


def causal_alignment(is_causal, attn_mask, query: torch.Tensor, key: torch.Tensor):
    """The ops' `causal` argument ("none", "upper_left" or "lower_right") for the API's ``is_causal`` and
    ``attn_mask`` on these query and key, and the attn_mask left to pass on.

    ``is_causal``: False, True / "upper_left" (query i attends keys j <= i, torch's is_causal), "lower_right"
    (j <= i + S - L), or a torch.nn.attention.bias.CausalVariant. An ``attn_mask`` that is torch's
    ``CausalBias`` (``causal_upper_left(L, S)`` / ``causal_lower_right(L, S)``) is that causality, not a
    tensor: its storage holds nothing. Two causal conditions together keep the pairs both allow.
    """
    alignment = _alignment_of(is_causal)
    if isinstance(attn_mask, CausalBias):
        # Too few dims leave (L, S) undefined: the op names that error.
        L, S = (query.size(-2), key.size(-2)) if query.dim() >= 2 and key.dim() >= 2 else (0, 0)
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
            raise AttentionValueError(
                f"mha_ext: attn_mask is a CausalBias for (L, S) = ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}), "
                f"but query and key have (L, S) = ({L}, {S})")
        from_mask = _alignment_of(attn_mask.variant)
        if alignment in ("none", from_mask):
            alignment = from_mask
        else:  # both alignments: the diagonal nearer the top (offset min(0, S - L)) decides
            alignment = "upper_left" if S >= L else "lower_right"
        attn_mask = None
    return alignment, attn_mask
