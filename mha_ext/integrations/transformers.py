"""Hugging Face transformers integration: ``attn_implementation="mha_ext"``.

    import mha_ext.integrations.transformers
    mha_ext.integrations.transformers.register()
    model = AutoModel.from_pretrained(path, attn_implementation="mha_ext")
    model.set_attn_implementation("mha_ext")  # the same, on a model already loaded

Needs the optional dependency ``transformers`` (``pip install mha_ext[transformers]``).
"""

from __future__ import annotations

import torch

from ..functional import attention_weights, scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward"]

NAME = "mha_ext"


def register() -> None:
    """Register ``"mha_ext"`` as an attention implementation of transformers (idempotent).

    Two registrations are needed: the attention function, and the mask builder that decides what
    mask reaches it. The mask builder is transformers' ``sdpa_mask``, whose convention is mha_ext's
    own (bool, ``True`` = attend, ``(N, 1, L, S)``, or ``None`` when ``is_causal`` is enough);
    without it transformers would pass no mask at all to an unknown implementation.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(
            "mha_ext.integrations.transformers needs the transformers package: from the mha_ext checkout, "
            "pip install --no-build-isolation '.[transformers]' (or pip install transformers)"
        ) from error
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature, computed by ``mha_ext.scaled_dot_product_attention``.

    ``query`` ``(B, Hq, L, E)``, ``key`` / ``value`` ``(B, Hkv, S, E / Ev)``; grouped-query models
    (``Hkv < Hq``) run with ``enable_gqa=True``, without repeating K/V. ``attention_mask`` is what
    transformers' mask builders give: bool ``(B, 1, L, S)`` with ``True`` = attend (``sdpa_mask``,
    registered by :func:`register`) or a float mask added to the scores (a custom 4-D mask passed
    by the user); ``None`` means no mask, plus causal masking when the module is causal and
    ``L > 1``, as in transformers' ``sdpa`` implementation. ``position_bias`` (T5-style) is added
    as ``attn_bias``. Returns ``(attn_output (B, L, Hq, Ev), attn_weights)``, the weights
    ``(B, Hq, L, S)`` only when ``output_attentions=True`` (recomputed from the log-sum-exp).
    """
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"attn_implementation='mha_ext' does not support {unsupported!r} (got a value for it); "
                "use attn_implementation='eager' for this model"
            )
    if kwargs.get("cache") is not None:
        raise NotImplementedError(
            "attn_implementation='mha_ext' does not support paged caches (continuous batching); got cache="
            f"{type(kwargs['cache']).__name__}"
        )
    q_length = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # Same rule as transformers' sdpa: the flag only stands in for a mask that was skipped, and a single
    # query token (decoding) attends every cached key. Causal masking is top-left aligned, so keys past
    # L (an empty static cache) are excluded by it without cropping them.
    is_causal = bool(is_causal) and attention_mask is None and q_length > 1
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    output_attentions = bool(kwargs.get("output_attentions", False))
    arguments = dict(
        attn_mask=attention_mask,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        attn_bias=position_bias,
    )
    result = scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, return_lse=output_attentions, **arguments
    )
    weights = None
    if output_attentions:
        result, lse = result
        weights = attention_weights(query, key, lse=lse, **arguments)
    return result.transpose(1, 2).contiguous(), weights
