"""Builds the tensors of one case, identically for every implementation (fixed seed, generated on the CPU
then moved, so CPU and CUDA runs see the same numbers).

Mask conventions: ``keep`` is bool ``(B, 1, 1, S)`` with True = attend (torch SDPA / mha_ext);
``bias`` is float ``(1, Hq, L, S)`` added to the scaled scores; causal is top-left aligned (SDPA's
``is_causal``). Implementations with other conventions convert from these (see implementations.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .cases import FORWARD_BACKWARD, Case, Mask

SEED = 1234


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclasses.dataclass
class CaseInputs:
    case: Case
    device: torch.device
    query: torch.Tensor  # (B, Hq, L, E)
    key: torch.Tensor  # (B, Hkv, S, E)
    value: torch.Tensor  # (B, Hkv, S, Ev)
    keep: torch.Tensor | None  # bool (B, 1, 1, S), True = attend
    bias: torch.Tensor | None  # float (1, Hq, L, S); requires grad for Mask.BIAS_GRAD
    grad_output: torch.Tensor | None  # (B, Hq, L, Ev), the upstream gradient for forward+backward

    @property
    def is_causal(self) -> bool:
        return self.case.mask is Mask.CAUSAL

    @property
    def dropout_p(self) -> float:
        return self.case.mask.dropout_p

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.case.shape.head_dim)

    @property
    def needs_grad(self) -> bool:
        return self.case.direction == FORWARD_BACKWARD

    @functools.cached_property
    def keep_and_bias_as_float(self) -> torch.Tensor:
        """``bias`` with ``-inf`` where ``keep`` is False, ``(B, Hq, L, S)``: the single float ``attn_mask``
        that torch SDPA needs for the bool+bias case. Built once, outside the timed region (which favours
        torch: a real caller would pay for this combination on every call)."""
        return self.bias.detach().masked_fill(~self.keep, float("-inf"))

    @functools.cached_property
    def causal_keep(self) -> torch.Tensor:
        """bool ``(L, S)``, True = attend, top-left aligned like SDPA's ``is_causal``."""
        shape = self.case.shape
        return torch.ones(shape.len_q, shape.len_kv, dtype=torch.bool, device=self.device).tril()

    @functools.cached_property
    def hidden(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs for the ``nn.MultiheadAttention`` rows (batch_first): query states ``(B, L, Hq*E)``,
        key/value states ``(B, S, Hq*E)`` (the same tensor when L == S: self-attention), and the
        gradient of the module output."""
        shape = self.case.shape
        embed = shape.heads_q * shape.head_dim
        generator = torch.Generator().manual_seed(SEED + 1)

        def make(*size, requires_grad):
            t = torch.randn(*size, generator=generator).to(self.device, torch_dtype(self.case.dtype))
            return t.requires_grad_(requires_grad)

        query = make(shape.batch, shape.len_q, embed, requires_grad=self.needs_grad)
        memory = query if shape.len_q == shape.len_kv else make(
            shape.batch, shape.len_kv, embed, requires_grad=self.needs_grad)
        grad = make(shape.batch, shape.len_q, embed, requires_grad=False) if self.needs_grad else None
        return query, memory, grad

    def attended_query_rows(self) -> torch.Tensor | None:
        """bool ``(B, 1, L, 1)``: query rows that attend at least one key (outputs of fully masked rows are
        implementation-defined, so the correctness check ignores them); None when every row attends.
        Top-left causal row i sees keys 0..i, so it attends something iff the first kept key is <= i."""
        if self.keep is None:
            return None  # no mask, or causal alone: every row sees key 0
        shape = self.case.shape
        kept = self.keep[:, 0, 0, :]  # (B, S)
        first_kept = torch.where(kept.any(-1), kept.int().argmax(-1), shape.len_kv)  # (B,)
        rows = torch.arange(shape.len_q, device=self.device)[None, :]  # (1, L)
        last_visible = rows if self.is_causal else torch.full_like(rows, shape.len_kv - 1)
        attends = (first_kept[:, None] <= last_visible)[:, None, :, None]  # (B, 1, L, 1)
        return None if bool(attends.all()) else attends


def make_inputs(case: Case, device: torch.device | str) -> CaseInputs:
    """Random q/k/v (standard normal), the case's mask tensors, and an upstream gradient for fwd+bwd.

    The padding mask pads the last ``S // 2`` keys of every sequence (50% of keys)."""
    device = torch.device(device)
    shape = case.shape
    dtype = torch_dtype(case.dtype)
    needs_grad = case.direction == FORWARD_BACKWARD
    generator = torch.Generator().manual_seed(SEED)

    def make(*size, requires_grad=False):
        t = torch.randn(*size, generator=generator).to(device, dtype)
        return t.requires_grad_(requires_grad)

    query = make(shape.batch, shape.heads_q, shape.len_q, shape.head_dim, requires_grad=needs_grad)
    key = make(shape.batch, shape.heads_kv, shape.len_kv, shape.head_dim, requires_grad=needs_grad)
    value = make(shape.batch, shape.heads_kv, shape.len_kv, shape.head_dim_v, requires_grad=needs_grad)
    keep = None
    if case.mask.has_keep:
        keep = torch.ones(shape.batch, 1, 1, shape.len_kv, dtype=torch.bool)
        keep[..., shape.len_kv - shape.len_kv // 2:] = False
        keep = keep.to(device)
    bias = None
    if case.mask.has_bias:
        bias = make(1, shape.heads_q, shape.len_q, shape.len_kv, requires_grad=case.mask is Mask.BIAS_GRAD)
    grad_output = make(shape.batch, shape.heads_q, shape.len_q, shape.head_dim_v) if needs_grad else None
    return CaseInputs(case, device, query, key, value, keep, bias, grad_output)
