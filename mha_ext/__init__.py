"""mha_ext: fused multi-head attention with additive and boolean masks, as torch ops with autograd.

    import mha_ext
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # bool mask: True = attend

The ops are torch.ops.mha_ext.attention_forward / attention_backward / attention_weights /
attention_dropout_mask / attention_explain, and varlen_attention_forward / varlen_attention_backward for packed
sequences of different lengths (mha_ext.varlen_attention). mha_ext.explain(...) says which kernels a call runs and why;
mha_ext.settings(...) switches between equivalent kernels for a scope. mha_ext.distributed (imported on its
own) splits one sequence between the ranks of a torch.distributed group: ring and all-to-all attention.
mha_ext.install() / uninstall() / sdpa_override() route torch.nn.functional.scaled_dot_product_attention to
mha_ext (mha_ext.sdpa_routing).
"""

from . import _loader

_C = _loader.load()

from . import errors, ops  # noqa: E402  (ops registers autograd and fake kernels for the ops loaded above)
from ._explain import Explanation, KernelChoice, explain  # noqa: E402
from ._loader import build_info  # noqa: E402
from ._settings import current_settings, settings  # noqa: E402
from .functional import attention_weights, dropout_mask, scaled_dot_product_attention  # noqa: E402
from . import varlen  # noqa: E402
from .varlen import varlen_attention  # noqa: E402
from . import masks, nn  # noqa: E402  (integrations stay opt-in: transformers is an optional dependency)
from . import sdpa_routing  # noqa: E402
from .sdpa_routing import install, is_installed, sdpa_override, uninstall  # noqa: E402

__version__ = "0.2.0"

__all__ = ["scaled_dot_product_attention", "varlen_attention", "varlen", "attention_weights", "dropout_mask",
           "explain", "Explanation", "KernelChoice", "settings", "current_settings", "build_info", "errors", "masks",
           "nn", "ops", "install", "uninstall", "sdpa_override", "is_installed", "sdpa_routing", "__version__"]
