"""The correctness guard: before an implementation is timed on a case, its output (and, for
forward+backward, its gradients) must match the torch reference of the same case within a loose
tolerance; otherwise its row reports "mismatch" and no speed.

Errors are measured relative to the reference's largest magnitude: max|x - ref| / max|ref|.
Query rows that attend nothing (fully masked) are left out of the output comparison.
"""

from __future__ import annotations

import dataclasses

import torch

from .implementations import Outputs

# Relative tolerance per dtype (outputs; gradients get twice as much).
TOLERANCE = {"float32": 2e-3, "bfloat16": 4e-2, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Check:
    ok: bool
    worst_error: float
    detail: str  # which tensor was worst, and its error against the tolerance


def relative_error(value: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    value, reference = value.detach().float(), reference.detach().float()
    if value.shape != reference.shape:
        return float("inf")
    if rows is not None:
        value, reference = value.masked_fill(~rows, 0.0), reference.masked_fill(~rows, 0.0)
    if not bool(torch.isfinite(value).all()):
        return float("inf")
    scale = reference.abs().max().item()
    return (value - reference).abs().max().item() / max(scale, 1e-12)


def compare(result: Outputs, reference: Outputs, dtype: str, attended_rows: torch.Tensor | None) -> Check:
    """``attended_rows``: bool ``(B, 1, L, 1)`` of the query rows that attend a key (None = all); applied to
    4-D attention outputs ``(B, H, L, Ev)`` and, squeezed, to module outputs ``(B, L, D)``."""
    tolerance = TOLERANCE[dtype]
    rows = attended_rows
    if rows is not None and result.output.dim() == 3:
        rows = rows[:, 0]
    errors = {"output": (relative_error(result.output, reference.output, rows), tolerance)}
    for name, grad in reference.grads.items():
        mine = result.grads.get(name)
        if mine is None:
            errors[f"d{name}"] = (float("inf"), 2 * tolerance)
        else:
            errors[f"d{name}"] = (relative_error(mine, grad), 2 * tolerance)
    worst_name = max(errors, key=lambda name: errors[name][0] / errors[name][1])
    worst, limit = errors[worst_name]
    return Check(all(error <= tol for error, tol in errors.values()), worst,
                 f"{worst_name} rel. error {worst:.2e} (tolerance {limit:.0e})")
