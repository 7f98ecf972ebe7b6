"""All-to-all ("Ulysses") attention: one all-to-all turns every rank's shard of the sequence for all heads
into all of the sequence for its share of the heads; the single-device op runs on that, and a second
all-to-all turns the output back. Each all-to-all is a permutation of the data, so each one's backward is
the other.
"""

from __future__ import annotations

import torch

from .._checks import run_op
from ..errors import AttentionValueError
from ._comm import all_to_all, group_rank_and_size
from ._common import check_arguments, shard_lengths, shared_rng_state
from ._layout import check_layout, segments

_ops = torch.ops.mha_ext


class _Exchange:
    """The group, its ranks' sequence shard lengths and layout: what moves rows between the sequence-sharded
    and the head-sharded arrangements."""

    def __init__(self, group, lengths: list[int], layout: str):
        self.group, self.lengths, self.layout = group, lengths, layout
        self.rank, self.size = group_rank_and_size(group)

    def _rows_of(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """`rank`'s shard (dim -2) of a tensor in global order."""
        parts = [full[..., s.positions, :] for s in segments(self.layout, self.lengths, rank)]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=-2)

    def _in_global_order(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Every rank's shard (dim -2), pieces[p] from rank p, put together in global order."""
        first = pieces[0]
        out = first.new_empty(first.shape[:-2] + (sum(self.lengths), first.size(-1)))
        for rank, piece in enumerate(pieces):
            for s in segments(self.layout, self.lengths, rank):
                out[..., s.positions, :] = piece[..., s.rows, :]
        return out

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, L_r, D) on each rank -> (..., H / P, L, D): this rank's heads, the whole sequence."""
        chunks = [c.contiguous() for c in x.chunk(self.size, dim=-3)]
        shapes = [chunks[0].shape[:-2] + (length, x.size(-1)) for length in self.lengths]
        return self._in_global_order(all_to_all(chunks, shapes, self.group))

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of to_heads."""
        chunks = [self._rows_of(y, rank) for rank in range(self.size)]
        shape = y.shape[:-2] + (self.lengths[self.rank], y.size(-1))
        return torch.cat(all_to_all(chunks, [shape] * self.size, self.group), dim=-3)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L_r, D) on each rank -> (..., L, D) on every rank."""
        shapes = [x.shape[:-2] + (length, x.size(-1)) for length in self.lengths]
        return self._in_global_order(all_to_all([x.contiguous()] * self.size, shapes, self.group))

    def sum_rows_back(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint of gather_rows: each rank's rows of every rank's y, summed in rank order."""
        chunks = [self._rows_of(y, rank) for rank in range(self.size)]
        shape = y.shape[:-2] + (self.lengths[self.rank], y.size(-1))
        total = None
        for piece in all_to_all(chunks, [shape] * self.size, self.group):
            total = piece.clone() if total is None else total.add_(piece)
        return total


class _Move(torch.autograd.Function):
    """A differentiable exchange: forward by `forward_name`, backward by its adjoint."""

    ADJOINT = {"to_heads": "to_sequence", "to_sequence": "to_heads", "gather_rows": "sum_rows_back"}

    @staticmethod
    def forward(ctx, x, exchange, forward_name):
        ctx.exchange, ctx.backward_name = exchange, _Move.ADJOINT[forward_name]
        return getattr(exchange, forward_name)(x)

    @staticmethod
    def backward(ctx, grad):
        return getattr(ctx.exchange, ctx.backward_name)(grad.contiguous()), None, None


def _mask_to_heads(name, tensor, exchange, heads, local_rows, key_total):
    """A mask with this rank's query rows, arranged like the head-sharded queries: its head dim split like
    the queries' (when it has one of `heads`), its rows gathered from every rank (when not broadcast)."""
    if tensor is None:
        return None
    rows = tensor.size(-2) if tensor.dim() >= 2 else 1
    mask_heads = tensor.size(-3) if tensor.dim() >= 3 else 1
    if tensor.size(-1) not in (1, key_total) or rows not in (1, local_rows) or mask_heads not in (1, heads):
        raise AttentionValueError(
            f"mha_ext.distributed: {name} must have the query's heads or 1 (dim -3: {heads}), this rank's query rows "
            f"or 1 (dim -2: {local_rows}) and the whole key sequence or 1 (dim -1: {key_total}), got shape "
            f"{tuple(tensor.shape)}")
    split_heads, gather = mask_heads == heads and heads > 1, rows == local_rows and rows != 1
    if split_heads and gather:
        return _Move.apply(tensor, exchange, "to_heads")
    if gather:
        return _Move.apply(tensor, exchange, "gather_rows")
    if split_heads:
        share = heads // exchange.size
        return tensor.narrow(-3, exchange.rank * share, share)
    return tensor


def ulysses_attention(query, key, value, attn_mask=None, attn_bias=None, is_causal=False, scale=None,
                      dropout_p=0.0, enable_gqa=False, *, group=None, layout="contiguous", return_lse=False,
                      generator=None):
    """Sequence-parallel attention by all-to-all: the same arguments, shards and results as
    :func:`mha_ext.distributed.ring_attention` (bool ``attn_mask`` **True = attend**, floating masks added;
    masks hold this rank's query rows and the whole key sequence), for head counts that the group divides.

    query (..., Hq, L_r, E), key/value (..., Hkv, S_r, E / Ev) with Hq and Hkv multiples of the group size
    (grouped-query attention with enable_gqa=True). Each rank runs the single-device op on Hq / P heads and the
    whole sequence, so the causal alignments, dropout (the single-device call's decisions) and any mask shape
    work as there; a mask with the query's heads and rows moves with the queries, one broadcast over heads
    is gathered whole on every rank. A floating mask or bias gets this rank's part of its gradient (the ranks'
    parts sum to the single-device gradient).
    """
    alignment, scale, dropout_p = check_arguments(query, key, value, attn_mask, attn_bias, is_causal, scale,
                                                  dropout_p, enable_gqa)
    layout = check_layout(layout)
    rank, size = group_rank_and_size(group)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() < 3 or tensor.size(-3) % size:
            raise AttentionValueError(
                f"mha_ext.distributed.ulysses_attention: {name}'s head count (dim -3) must be a multiple of the "
                f"group size {size}, got shape {tuple(tensor.shape)}; use ring_attention otherwise")
    query_lengths, key_lengths = shard_lengths(query, key, value, group, layout)
    queries, keys = _Exchange(group, query_lengths, layout), _Exchange(group, key_lengths, layout)
    heads, key_total = query.size(-3), sum(key_lengths)
    mask = _mask_to_heads("attn_mask", attn_mask, queries, heads, query.size(-2), key_total)
    bias = _mask_to_heads("attn_bias", attn_bias, queries, heads, query.size(-2), key_total)
    rng_state = None
    if dropout_p > 0.0:
        share = heads // size
        rng_state = torch.tensor(shared_rng_state(query.device, generator, group) + [0, 0, rank * share, heads],
                                 device=query.device)
    out, lse = run_op(_ops.attention_forward, _Move.apply(query, queries, "to_heads"),
                      _Move.apply(key, keys, "to_heads"), _Move.apply(value, keys, "to_heads"), mask, bias, alignment,
                      scale, dropout_p, rng_state)
    out = _Move.apply(out, queries, "to_sequence")
    if not return_lse:
        return out
    return out, _Move.apply(lse.unsqueeze(-1), queries, "to_sequence").squeeze(-1)
