"""mha_ext: fused multi-head attention with additive and boolean masks, as torch ops with autograd.

    import mha_ext
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # bool mask: True = attend

The ops are torch.ops.mha_ext.attention_forward / attention_backward / attention_weights.
"""

from . import _loader

_C = _loader.load()

from . import ops  # noqa: E402  (registers autograd and fake kernels for the ops loaded above)
from .functional import attention_weights, dropout_mask, scaled_dot_product_attention  # noqa: E402
from . import masks, nn  # noqa: E402  (integrations stay opt-in: transformers is an optional dependency)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build was compiled with: torch version, CPU ISA, CPU GEMM engine, CUDA and its archs."""
    return dict(_C.build_info())


__all__ = ["scaled_dot_product_attention", "attention_weights", "dropout_mask", "build_info", "masks", "nn", "ops", "__version__"]
