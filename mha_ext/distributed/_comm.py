"""Communication for sequence-parallel attention, all through torch.distributed (gloo, NCCL, ...): the ring's
point-to-point exchanges, the all-to-all, and a traffic counter for the benchmark.

Every wait is bounded by the process group's timeout (``init_process_group(timeout=...)``): a rank that
fails makes the others raise instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Traffic:
    """Bytes this rank sent and received while counting, and the number of messages it sent."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0


_counters: list[Traffic] = []


@contextlib.contextmanager
def count_traffic():
    """``with count_traffic() as traffic:`` counts what ring_attention / ulysses_attention send on this rank."""
    traffic = Traffic()
    _counters.append(traffic)
    try:
        yield traffic
    finally:
        _counters.remove(traffic)


def _count(sent: int, received: int) -> None:
    for traffic in _counters:
        traffic.bytes_sent += sent
        traffic.bytes_received += received
        traffic.messages += 1 if sent else 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes: what travels, whatever the dtype (bool and bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8)


def group_rank_and_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mha_ext.distributed: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or launch with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


class Ring:
    """The ranks of a group in a ring: each sends to the next and receives from the previous one."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group_rank_and_size(group)
        self._next = self._global((self.rank + 1) % self.size)
        self._previous = self._global((self.rank - 1) % self.size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def shift(self, sends: list[torch.Tensor], receives: list[torch.Tensor], tag: int) -> list:
        """Starts sending each of `sends` (contiguous) to the next rank and receiving the previous rank's into
        `receives`; returns the pending works for :meth:`wait`. Posted before the local compute so that the
        transfer overlaps it."""
        ops = []
        for index, (send, receive) in enumerate(zip(sends, receives)):
            _count(_nbytes(send), _nbytes(receive))
            ops.append(dist.P2POp(dist.irecv, _bytes(receive), self._previous, self.group, tag + index))
            ops.append(dist.P2POp(dist.isend, _bytes(send), self._next, self.group, tag + index))
        # One batch: NCCL runs them in one group call (a lone recv ahead of the send would deadlock two ranks
        # that are each other's next and previous); gloo posts them all at once.
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for work in works:
            work.wait()


def all_gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every rank's `values` (same count on each), in rank order; `device` is where the group's backend
    communicates (the CPU for gloo, the current GPU for NCCL)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    _, size = group_rank_and_size(group)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    return [t.tolist() for t in gathered]


def all_to_all(chunks: list[torch.Tensor], receive_shapes: list[tuple], group) -> list[torch.Tensor]:
    """Sends chunks[p] to rank p and returns what every rank p sent here, shaped receive_shapes[p]."""
    send = torch.cat([c.reshape(-1) for c in chunks])
    sizes_out = [c.numel() for c in chunks]
    sizes_in = [int(torch.Size(s).numel()) for s in receive_shapes]
    receive = send.new_empty(sum(sizes_in))
    rank, width = dist.get_rank(group), send.element_size()
    _count(width * (send.numel() - sizes_out[rank]), width * (receive.numel() - sizes_in[rank]))
    dist.all_to_all_single(_bytes(receive), _bytes(send), [n * width for n in sizes_in],
                           [n * width for n in sizes_out], group=group)
    return [piece.view(shape) for piece, shape in zip(receive.split(sizes_in), receive_shapes)]
