"""Layers built on mha_ext's fused attention: a drop-in ``nn.MultiheadAttention`` and a model-wide swap."""

from mha_ext.nn.multihead_attention import MultiheadAttention
from mha_ext.nn.replace import replace_attention

__all__ = ["MultiheadAttention", "replace_attention"]
