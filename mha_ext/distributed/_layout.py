"""How a sequence is split across the ranks of a process group, and helpers to shard and unshard it.

Each rank holds *segments* of the global sequence, in order: "contiguous" gives rank r one run of positions
(ranks may hold different lengths); "zigzag" cuts the sequence into 2·P equal chunks and gives rank r chunks
r and 2·P − 1 − r, so that under causal attention every rank has the same amount of work.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..errors import AttentionValueError
from ._comm import all_gather_ints, group_rank_and_size

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class Segment:
    local: int    # its first row in the rank's shard
    start: int    # its first position in the global sequence
    length: int

    @property
    def rows(self) -> slice:
        return slice(self.local, self.local + self.length)

    @property
    def positions(self) -> slice:
        return slice(self.start, self.start + self.length)


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise AttentionValueError(f"mha_ext.distributed: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_lengths(layout: str, name: str, lengths: list[int]) -> None:
    """A zigzag shard is two equal chunks, and every rank's shard has the same length."""
    if layout == "zigzag" and (len(set(lengths)) != 1 or lengths[0] % 2):
        raise AttentionValueError(
            f"mha_ext.distributed: with layout='zigzag' every rank's {name} shard must have the same even length "
            f"(two equal chunks), got lengths {lengths}; shard with mha_ext.distributed.shard(..., layout='zigzag')")


def segments(layout: str, lengths: list[int], rank: int) -> list[Segment]:
    """The segments of the global sequence that `rank` holds, given every rank's shard length."""
    if layout == "contiguous":
        return [Segment(0, sum(lengths[:rank]), lengths[rank])]
    chunk, world = lengths[rank] // 2, len(lengths)
    return [Segment(0, rank * chunk, chunk), Segment(chunk, (2 * world - 1 - rank) * chunk, chunk)]


def shard(tensor: torch.Tensor, dim: int = -2, *, layout: str = "contiguous", group=None, rank: int | None = None,
          world_size: int | None = None) -> torch.Tensor:
    """This rank's shard of a full-length `tensor` along `dim` (default -2, the sequence dim of
    (..., H, L, E) inputs and the row dim of (..., L, S) masks).

    "contiguous": ``torch.tensor_split`` into world_size runs (the first ranks get one more position when the
    length does not divide). "zigzag": the length must divide into 2·world_size chunks; rank r gets chunks r
    and 2·world_size − 1 − r. `rank` and `world_size` default to the group's (the default group's).
    """
    layout = check_layout(layout)
    if rank is None or world_size is None:
        rank, world_size = group_rank_and_size(group)
    length = tensor.size(dim)
    if layout == "contiguous":
        return torch.tensor_split(tensor, world_size, dim)[rank]
    if length % (2 * world_size):
        raise AttentionValueError(
            f"mha_ext.distributed.shard: layout='zigzag' needs the length along dim {dim} to divide into "
            f"2 * world_size = {2 * world_size} chunks, got {length}")
    chunks = tensor.chunk(2 * world_size, dim)
    return torch.cat((chunks[rank], chunks[2 * world_size - 1 - rank]), dim)


def unshard(local: torch.Tensor, dim: int = -2, *, layout: str = "contiguous", group=None) -> torch.Tensor:
    """The full-length tensor from every rank's shard (a collective: every rank of the group calls it);
    the inverse of :func:`shard`."""
    layout = check_layout(layout)
    rank, world_size = group_rank_and_size(group)
    dim = dim % local.dim()
    lengths = [length for (length,) in all_gather_ints([local.size(dim)], group, local.device)]
    check_lengths(layout, "tensor's", lengths)
    # all_gather takes equal sizes: pad every shard to the longest.
    padded_shape = list(local.shape)
    padded_shape[dim] = max(lengths)
    padded = local.new_zeros(padded_shape)
    padded.narrow(dim, 0, local.size(dim)).copy_(local)
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    full_length = sum(lengths)
    out = local.new_empty(padded_shape[:dim] + [full_length] + padded_shape[dim + 1:])
    for r, piece in enumerate(pieces):
        for segment in segments(layout, lengths, r):
            out.narrow(dim, segment.start, segment.length).copy_(piece.narrow(dim, segment.local, segment.length))
    return out
