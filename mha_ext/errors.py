"""The exceptions mha_ext raises for bad input, catchable the way code written for torch expects.

torch's SDPA raises ``RuntimeError`` for invalid arguments and ``torch.nn.MultiheadAttention``
``AssertionError``; Python code expects ``ValueError`` / ``TypeError``. mha_ext's errors are all of
these at once, so ``except RuntimeError``, ``except ValueError`` (or ``TypeError``) and, from the
layer, ``except AssertionError`` all catch them. Each message names the argument, the expected and
the actual value.

The ops themselves (``torch.ops.mha_ext.*``, called directly or inside a ``torch.compile`` graph)
raise torch's own ``ValueError`` / ``TypeError`` with the same messages.
"""

from __future__ import annotations

__all__ = ["AttentionValueError", "AttentionTypeError", "LayerValueError", "LayerTypeError"]


class AttentionValueError(ValueError, RuntimeError):
    """An argument with a wrong value or shape (a ``ValueError`` and, as torch's SDPA raises, a ``RuntimeError``)."""


class AttentionTypeError(TypeError, RuntimeError):
    """An argument of a wrong type or dtype (a ``TypeError`` and, as torch's SDPA raises, a ``RuntimeError``)."""


class LayerValueError(AttentionValueError, AssertionError):
    """``mha_ext.nn.MultiheadAttention``'s wrong value or shape: also an ``AssertionError``, as torch's layer raises."""


class LayerTypeError(AttentionTypeError, AssertionError):
    """``mha_ext.nn.MultiheadAttention``'s wrong type or dtype: also an ``AssertionError``, as torch's layer raises."""
