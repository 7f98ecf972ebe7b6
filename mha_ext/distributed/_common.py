"""Argument checks and the dropout draw shared by ring_attention and ulysses_attention."""

from __future__ import annotations

from .. import ops
from .._checks import _alignment_of, check_dropout_p, require_optional_tensor, require_tensor, resolve_scale
from ..errors import AttentionTypeError, AttentionValueError
from ..functional import _check_devices, _check_heads, _draw_rng_state
from ._comm import all_gather_ints
from ._layout import check_lengths


def check_arguments(query, key, value, attn_mask, attn_bias, is_causal, scale, dropout_p, enable_gqa):
    """(causal alignment or "none", scale, dropout_p) after the single-device API's checks."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        require_tensor(name, tensor)
        if tensor.dim() < 2:
            raise AttentionTypeError(f"mha_ext.distributed: {name} must have a sequence dim (-2), got shape "
                                     f"{tuple(tensor.shape)}")
    require_optional_tensor("attn_mask", attn_mask)
    require_optional_tensor("attn_bias", attn_bias)
    dropout_p = check_dropout_p(dropout_p)
    scale = resolve_scale(scale, query.size(-1))
    _check_heads(query, key, value, enable_gqa)
    _check_devices(query, key=key, value=value, attn_mask=attn_mask, attn_bias=attn_bias)
    return _alignment_of(is_causal), scale, dropout_p


def query_heads(query, key, value) -> int:
    """Query heads per batch of the op's output grid (its flat batch-head index is batch · heads + head)."""
    lead = ops._leading_shape(query, key, value)
    return lead[-1] if lead else 1


def shared_rng_state(device, generator, group) -> list[int]:
    """[seed, offset] drawn by the group's first rank, as the single-device call would draw them, for all."""
    mine = _draw_rng_state(device, generator).tolist()
    return all_gather_ints(mine, group, device)[0]


def shard_lengths(query, key, value, group, layout: str) -> tuple[list[int], list[int]]:
    """Every rank's query and key shard lengths (dim -2), after checking that the ranks agree on the other
    dims and that each rank's key and value shards have the same length: one small all-gather, whose result
    every rank checks alike, so that an error is raised on all of them before any transfer."""
    others = [hash(tuple(t.shape[:-2]) + (t.size(-1),)) % 2**61 for t in (query, key, value)]
    mine = [query.size(-2), key.size(-2), value.size(-2)] + others
    gathered = all_gather_ints(mine, group, query.device)
    if any(g[3:] != others for g in gathered):
        raise AttentionValueError(
            "mha_ext.distributed: every rank must pass the same dims apart from the sequence dim (-2); shapes on "
            f"this rank: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    query_lengths, key_lengths = [g[0] for g in gathered], [g[1] for g in gathered]
    if [g[2] for g in gathered] != key_lengths:
        raise AttentionValueError(
            f"mha_ext.distributed: key and value must have the same sequence length (dim -2), got key {key.size(-2)} "
            f"and value {value.size(-2)}")
    check_lengths(layout, "query", query_lengths)
    check_lengths(layout, "key", key_lengths)
    return query_lengths, key_lengths
