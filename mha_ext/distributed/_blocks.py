"""One rank's attention on one visiting key/value block, as calls of the single-device op: which (query
segment, key segment) pairs causality leaves, with which of the op's causal alignments, the masks' slices
for them, their dropout coordinates, and the log-sum-exp merge of the partial results.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AttentionValueError
from ._layout import Segment


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """One op call: query rows `queries` (consecutive in the rank's shard) against keys `keys` (consecutive
    in the visiting block), with the op's `causal` argument."""

    queries: list[Segment]
    keys: list[Segment]
    causal: str

    @property
    def rows(self) -> slice:
        return slice(self.queries[0].local, self.queries[-1].local + self.queries[-1].length)

    @property
    def columns(self) -> slice:
        return slice(self.keys[0].local, self.keys[-1].local + self.keys[-1].length)


def _pair(query: Segment, key: Segment, causal_offset: int | None) -> str | None:
    """How key segment `key` is visible from query segment `query` when query position i attends key
    positions j <= i + causal_offset (None: every key): "none" (all of it), None (nothing), or the op's
    alignment that gives exactly the pairs allowed."""
    if causal_offset is None:
        return "none"
    first_row_reach = query.start + causal_offset          # the last key the first query row attends
    last_row_reach = first_row_reach + query.length - 1
    if key.start > last_row_reach:
        return None
    if key.start + key.length - 1 <= first_row_reach:
        return "none"
    diagonal = first_row_reach - key.start                  # local: row i attends columns j <= i + diagonal
    if diagonal == 0:
        return "upper_left"
    if diagonal == key.length - query.length:
        return "lower_right"
    raise AttentionValueError(
        "mha_ext.distributed: causal attention needs each block's diagonal to be its top-left or bottom-right "
        f"corner; query positions {query.start}..{query.start + query.length - 1} against key positions "
        f"{key.start}..{key.start + key.length - 1} cross it elsewhere. Shard query and key alike "
        "(the same lengths on every rank)")


def _consecutive(parts: list[Segment]) -> bool:
    return all(a.local + a.length == b.local for a, b in zip(parts, parts[1:]))


def plan(queries: list[Segment], keys: list[Segment], causal_offset: int | None, merge: bool) -> list[BlockCall]:
    """The op calls that cover this rank's queries against one visiting block. With `merge`, pairs that are
    all fully visible and sit in consecutive rows and columns run as one call (fewer, larger calls); without
    it (dropout, whose coordinates must be one run of global rows and columns) every pair is its own call."""
    pairs = [(q, k, _pair(q, k, causal_offset)) for q in queries for k in keys]
    visible = [(q, k, causal) for q, k, causal in pairs if causal is not None and q.length and k.length]
    if merge and visible and all(causal == "none" for _, _, causal in visible):
        rows = sorted({q for q, _, _ in visible}, key=lambda s: s.local)
        columns = sorted({k for _, k, _ in visible}, key=lambda s: s.local)
        if len(visible) == len(rows) * len(columns) and _consecutive(rows) and _consecutive(columns):
            return [BlockCall(rows, columns, "none")]
    return [BlockCall([q], [k], causal) for q, k, causal in visible]


def split_rows(calls: list[BlockCall], max_rows: int) -> list[BlockCall]:
    """The calls with every fully visible one cut into calls of at most `max_rows` query rows (a causal one
    keeps its rows: its diagonal is drawn on them). Smaller calls keep the partial output that each call
    returns, before it is merged, a fraction of the output's size."""
    pieces = []
    for call in calls:
        if call.causal != "none":
            pieces.append(call)
            continue
        for q in call.queries:
            for first in range(0, q.length, max_rows):
                length = min(max_rows, q.length - first)
                pieces.append(BlockCall([Segment(q.local + first, q.start + first, length)], call.keys, "none"))
    return pieces


def rows_of(tensor: torch.Tensor | None, call: BlockCall) -> torch.Tensor | None:
    """A mask's rows for the call: its dim -2 holds this rank's query rows, or 1 (broadcast)."""
    if tensor is None or tensor.dim() < 2 or tensor.size(-2) == 1:
        return tensor
    return tensor[..., call.rows, :]


def slice_mask(tensor: torch.Tensor | None, call: BlockCall) -> torch.Tensor | None:
    """A mask's slice for the call: its rows (this rank's, or broadcast) and the columns of the call's key
    positions (the mask's last dim is the global key sequence, or 1)."""
    tensor = rows_of(tensor, call)
    if tensor is None or tensor.size(-1) == 1:
        return tensor
    parts = [tensor[..., key.positions] for key in call.keys]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def add_mask_grad(total: torch.Tensor, grad: torch.Tensor, call: BlockCall) -> None:
    """Adds a call's gradient for slice_mask(mask, call) into `total`, the gradient of the whole mask."""
    if total.dim() >= 2 and total.size(-2) != 1:
        total = total[..., call.rows, :]
    if total.size(-1) == 1:
        total.add_(grad)
        return
    for key, part in zip(call.keys, grad.split([k.length for k in call.keys], dim=-1)):
        total[..., key.positions].add_(part)


def merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Folds one call's normalised result over `rows` into the running (out, lse), in place, in the
    accumulation dtype: out = Σ exp(lse_b − lse) · out_b, lse = log Σ exp(lse_b). A row with nothing to
    attend stays (0, −inf); NaN stays NaN."""
    old = lse[..., rows]
    new = torch.logaddexp(old, part_lse)
    shift = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    target = out[..., rows, :]
    target.mul_(torch.exp(old - shift).unsqueeze(-1))
    target.addcmul_(part_out, torch.exp(part_lse - shift).unsqueeze(-1))   # in place: no output-sized temporary
    lse[..., rows] = new
