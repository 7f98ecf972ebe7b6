"""``mha_ext.nn.replace_attention``: swap torch's attention layers in an existing model for mha_ext's."""

from __future__ import annotations

import warnings

import torch

from mha_ext.nn.multihead_attention import MultiheadAttention

__all__ = ["replace_attention"]


def replace_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn.MultiheadAttention`` inside ``model`` an ``mha_ext.nn.MultiheadAttention``, in place.

    Works on ``nn.Transformer``, ``nn.TransformerEncoder`` / ``Decoder`` (and their layers) and any
    user module holding ``nn.MultiheadAttention`` children (``model`` itself may be one). Each layer
    object is converted where it is (its class changes), so its parameters, buffers, hooks, device,
    dtype and training mode stay, and so do references to them held by optimizers or shared
    modules; outputs are unchanged.

    torch bypasses ``self_attn.forward`` in two fused inference paths, which would skip mha_ext:
    ``nn.TransformerEncoderLayer``'s ``torch._transformer_encoder_layer_fwd`` (refused because the
    converted layers carry a forward pre-hook) and ``nn.TransformerEncoder``'s nested-tensor path
    (turned off here by setting ``use_nested_tensor = False`` on encoders holding converted layers).

    Subclasses of ``nn.MultiheadAttention`` other than mha_ext's are left alone, with a warning:
    they may override ``forward``. Returns ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    skipped = []
    for name, module in model.named_modules():
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module._disable_torch_fast_paths()
        elif isinstance(module, torch.nn.MultiheadAttention) and not isinstance(module, MultiheadAttention):
            skipped.append(f"{name or '<model>'} ({type(module).__name__})")
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and any(
            isinstance(m, MultiheadAttention) for m in module.layers.modules()
        ):
            module.use_nested_tensor = False
    if skipped:
        warnings.warn(
            "replace_attention left these subclasses of torch.nn.MultiheadAttention unchanged, since they may "
            f"override forward: {', '.join(skipped)}",
            stacklevel=2,
        )
    return model
