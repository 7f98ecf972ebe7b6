"""Argument checks shared by the Python layer, so every entry point words its errors alike."""

from __future__ import annotations

import torch


def require_tensor(name: str, value) -> None:
    """TypeError naming the argument unless `value` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mha_ext: {name} must be a torch.Tensor, got {type(value).__name__}")


def require_optional_tensor(name: str, value) -> None:
    if value is not None:
        require_tensor(name, value)
