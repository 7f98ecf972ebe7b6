"""Ring attention: each rank keeps its shard of the queries; the key/value shards travel around the ring of
ranks, and each rank folds its queries' attention to every visiting block into its output by the log-sum-exp.
The backward sends the blocks around again, with their key/value gradients travelling behind them.

Overlap: every transfer is posted (isend/irecv) before the block it overlaps is computed and waited for
after; on gloo the transfer runs on gloo's own threads, on NCCL on its communication stream.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ops
from .._checks import run_op
from ..errors import AttentionValueError
from . import _blocks
from ._comm import Ring
from ._common import check_arguments, query_heads, shard_lengths, shared_rng_state
from ._layout import check_layout, segments

_ops = torch.ops.mha_ext
_KV_TAG, _GRAD_TAG = 1, 3   # + 0 for the key, + 1 for the value
_MIN_CALL_ROWS = 256        # fewer query rows per op call would make its products small


@dataclasses.dataclass
class _Setup:
    ring: Ring
    layout: str
    query_lengths: list[int]
    key_lengths: list[int]
    causal_offset: int | None   # query position i attends key positions j <= i + causal_offset
    scale: float
    dropout_p: float
    rng: list[int] | None       # [seed, offset] shared by the ranks
    heads: int

    def key_segments(self, owner: int):
        return segments(self.layout, self.key_lengths, owner)

    def query_segments(self):
        return segments(self.layout, self.query_lengths, self.ring.rank)

    def calls(self, owner: int) -> list[_blocks.BlockCall]:
        return _blocks.plan(self.query_segments(), self.key_segments(owner), self.causal_offset,
                            merge=self.dropout_p == 0.0)

    def rng_state(self, call: _blocks.BlockCall, device) -> torch.Tensor | None:
        if self.rng is None:
            return None
        return torch.tensor(self.rng + [call.queries[0].start, call.keys[0].start, 0, self.heads], device=device)


def _block_like(tensor: torch.Tensor, length: int, dtype=None) -> torch.Tensor:
    """An empty block shaped like `tensor` with `length` positions (dim -2)."""
    return tensor.new_empty(tensor.shape[:-2] + (length, tensor.size(-1)), dtype=dtype or tensor.dtype)


def _call_args(setup, call, query, key, value, attn_mask, attn_bias):
    return (query[..., call.rows, :], key[..., call.columns, :], value[..., call.columns, :],
            _blocks.slice_mask(attn_mask, call), _blocks.slice_mask(attn_bias, call), call.causal, setup.scale,
            setup.dropout_p, setup.rng_state(call, query.device))


def _turn(setup: _Setup, key, value):
    """One full turn of the key/value blocks: yields (owner, block key, block value) for the block this rank
    holds at each step, the next block already being received while the caller computes on this one. Two
    blocks at most are held beside the rank's own: the one computed on and the one arriving."""
    ring = setup.ring
    block = [key.contiguous(), value.contiguous()]
    for step in range(ring.size):
        owner = (ring.rank - step) % ring.size
        pending, incoming = [], None
        if step + 1 < ring.size:
            length = setup.key_lengths[(owner - 1) % ring.size]
            incoming = [_block_like(key, length), _block_like(value, length)]
            pending = ring.shift(block, incoming, _KV_TAG)
        yield owner, block[0], block[1]
        Ring.wait(pending)
        block = incoming


def _forward(setup: _Setup, query, key, value, attn_mask, attn_bias):
    lead = ops._leading_shape(query, key, value) + (query.size(-2),)
    acc = ops._accumulation_dtype(query.dtype)
    out = query.new_zeros(lead + (value.size(-1),), dtype=acc)
    lse = query.new_full(lead, float("-inf"), dtype=acc)
    # Calls of a quarter of the rows (at least _MIN_CALL_ROWS): each call's partial output, alive until it is
    # merged, is then a quarter of the output's size.
    max_rows = max(_MIN_CALL_ROWS, -(-query.size(-2) // 4))
    for owner, block_key, block_value in _turn(setup, key, value):
        for call in _blocks.split_rows(setup.calls(owner), max_rows):
            part_out, part_lse = run_op(_ops.attention_forward,
                                        *_call_args(setup, call, query, block_key, block_value, attn_mask, attn_bias))
            _blocks.merge(out, lse, call.rows, part_out, part_lse)
    return out.to(query.dtype), lse


def _backward(setup: _Setup, grad_out, grad_lse, out, lse, query, key, value, attn_mask, attn_bias, mask_grad,
              bias_grad):
    """Gradients of query, key, value and of the masks that need one. Each rank accumulates its queries'
    gradient; a block's key/value gradient travels behind the block, each rank adding its part in ring order,
    and reaches its owner after a full turn. Every sum has a fixed order: the result does not depend on timing."""
    ring = setup.ring
    acc = ops._accumulation_dtype(query.dtype)
    grad_query = torch.zeros(query.shape, dtype=acc, device=query.device)
    grad_mask = torch.zeros(attn_mask.shape, dtype=acc, device=query.device) if mask_grad else None
    grad_bias = torch.zeros(attn_bias.shape, dtype=acc, device=query.device) if bias_grad else None
    grads_pending, grads_incoming, block_grads = [], None, None
    for owner, block_key, block_value in _turn(setup, key, value):
        block_grads = [torch.zeros_like(block_key, dtype=acc), torch.zeros_like(block_value, dtype=acc)]
        grad_key, grad_value = block_grads
        for call in setup.calls(owner):
            rows = call.rows
            grads = run_op(_ops.attention_backward, grad_out[..., rows, :], out[..., rows, :], lse[..., rows],
                           None if grad_lse is None else grad_lse[..., rows], mask_grad, bias_grad,
                           *_call_args(setup, call, query, block_key, block_value, attn_mask, attn_bias))
            grad_query[..., rows, :] += grads[0]
            grad_key[..., call.columns, :] += grads[1]
            grad_value[..., call.columns, :] += grads[2]
            if mask_grad:
                _blocks.add_mask_grad(grad_mask, grads[3], call)
            if bias_grad:
                _blocks.add_mask_grad(grad_bias, grads[4], call)
        # The earlier ranks' part of this block's gradient arrives from the previous rank; ours goes after it.
        Ring.wait(grads_pending)
        if grads_incoming is not None:
            block_grads = [earlier.add_(ours) for earlier, ours in zip(grads_incoming, block_grads)]
        if ring.size > 1:
            length = setup.key_lengths[(owner - 1) % ring.size]
            grads_incoming = [_block_like(key, length, acc), _block_like(value, length, acc)]
            grads_pending = ring.shift(block_grads, grads_incoming, _GRAD_TAG)
    Ring.wait(grads_pending)   # after a full turn: our own block's gradient, every rank's part in it
    grad_key, grad_value = grads_incoming if ring.size > 1 else block_grads

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return (cast(grad_query, query), cast(grad_key, key), cast(grad_value, value), cast(grad_mask, attn_mask),
            cast(grad_bias, attn_bias))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, attn_bias, setup):
        out, lse = _forward(setup, query, key, value, attn_mask, attn_bias)
        ctx.setup = setup
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(out, lse, query, key, value, attn_mask, attn_bias)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, lse, query, key, value, attn_mask, attn_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask_grad = bool(needs[3]) and attn_mask is not None and attn_mask.is_floating_point()
        bias_grad = bool(needs[4]) and attn_bias is not None
        if grad_out is None:   # only the LSE was used
            grad_out = torch.zeros_like(out)
        grads = _backward(ctx.setup, grad_out.contiguous(), grad_lse, out, lse, query, key, value, attn_mask,
                          attn_bias, mask_grad, bias_grad)
        return grads + (None,)


def _causal_offset(alignment: str, query_total: int, key_total: int) -> int | None:
    if alignment == "none":
        return None
    return 0 if alignment == "upper_left" else key_total - query_total


def _check_mask(name, tensor, local_rows, key_total):
    if tensor is None:
        return
    rows = tensor.size(-2) if tensor.dim() >= 2 else 1
    if tensor.size(-1) not in (1, key_total) or rows not in (1, local_rows):
        raise AttentionValueError(
            f"mha_ext.distributed: {name} must have this rank's query rows (dim -2: {local_rows} or 1) and the "
            f"whole key sequence (dim -1: {key_total} or 1), got shape {tuple(tensor.shape)}")


def ring_attention(query, key, value, attn_mask=None, attn_bias=None, is_causal=False, scale=None, dropout_p=0.0,
                   enable_gqa=False, *, group=None, layout="contiguous", return_lse=False, generator=None):
    """Sequence-parallel attention over the ranks of `group` (default: the default process group): this
    rank's shard of the sequence in, this rank's rows of softmax(Q Kᵀ · scale + masks) V out, equal to the
    single-device :func:`mha_ext.scaled_dot_product_attention` on the gathered tensors.

    Every rank of the group calls it with its shards, sharded along dim -2 by `layout` (see
    :func:`mha_ext.distributed.shard`): query (..., Hq, L_r, E), key (..., Hkv, S_r, E), value
    (..., Hkv, S_r, Ev). "contiguous": rank r holds one run of positions, lengths may differ between ranks.
    "zigzag": two equal chunks per rank, which balances causal attention's work.

    Masks follow the single-device op's conventions: bool ``attn_mask`` **True = attend**, a floating
    attn_mask or attn_bias is added to the scores. Their dim -2 is this rank's query rows (L_r, in the
    shard's order) or 1, their last dim the **whole key sequence in global order** (S) or 1: e.g. a key-padding
    mask (B, 1, 1, S), or a bias sharded with ``shard(bias, dim=-2, layout=...)``. A floating mask or bias gets
    this rank's query rows' part of its gradient (the ranks' parts sum to the single-device gradient).

    is_causal: True / "upper_left" (query i attends keys j <= i in global positions) or "lower_right"
    (j <= i + S - L); query and key must be sharded alike wherever a block crosses the diagonal. Dropout makes
    the single-device call's decisions (its Philox counters are keyed by global rows, columns and heads), with
    the seed and offset drawn from `generator` on the group's first rank. Returns the output (..., Hq, L_r, Ev)
    and, with return_lse, its log-sum-exp (..., Hq, L_r) in float32 (float64 for float64 inputs).

    A collective: every rank of the group must call it, with the same leading dims and arguments; waits are
    bounded by the group's timeout.
    """
    alignment, scale, dropout_p = check_arguments(query, key, value, attn_mask, attn_bias, is_causal, scale,
                                                  dropout_p, enable_gqa)
    layout = check_layout(layout)
    ring = Ring(group)
    query_lengths, key_lengths = shard_lengths(query, key, value, group, layout)
    key_total = sum(key_lengths)
    _check_mask("attn_mask", attn_mask, query.size(-2), key_total)
    _check_mask("attn_bias", attn_bias, query.size(-2), key_total)
    setup = _Setup(ring, layout, query_lengths, key_lengths,
                   _causal_offset(alignment, sum(query_lengths), key_total), scale, dropout_p,
                   shared_rng_state(query.device, generator, group) if dropout_p > 0.0 else None,
                   query_heads(query, key, value))
    # Every rank plans every rank's blocks (arithmetic on the lengths), so that a layout the causal blocks do
    # not allow raises on all ranks alike, before any transfer.
    for rank in range(ring.size):
        for owner in range(ring.size):
            _blocks.plan(segments(layout, query_lengths, rank), setup.key_segments(owner), setup.causal_offset,
                         merge=False)
    out, lse = _RingAttention.apply(query, key, value, attn_mask, attn_bias, setup)
    return (out, lse) if return_lse else out
