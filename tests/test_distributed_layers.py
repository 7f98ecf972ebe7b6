"""Sequence-parallel layers (mha_ext.distributed.SequenceParallel / sequence_parallel) on gloo process groups of
local processes: the wrapped mha_ext.nn.MultiheadAttention (and an nn.TransformerEncoder made sequence-parallel)
on each rank's shards against the unsharded layer on the whole sequence: outputs, the inputs' and floating masks'
gradients, and every parameter's gradient summed over the ranks, for both schemes and layouts, batch_first or
not, key padding, bool / float / per-head attn_mask rows, causality, cross-attention, dropout, unbatched inputs,
eval mode. Each world size runs all its cases in one group (tests/helpers/distributed_layers_cases.py); the
wrapper's construction, errors, state dict and model wrapping are checked in this process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mha_ext.nn
from helpers.distributed import run_on_ranks
from helpers.distributed_layers_cases import Case
from mha_ext.distributed import SequenceParallel, sequence_parallel
from mha_ext.errors import LayerTypeError, LayerValueError

_BASE = [
    Case(),
    Case(batch_first=False, key_padding="bool"),
    Case(attn_mask="bool"),
    Case(layout="zigzag", causal=True),
    Case(layout="zigzag", causal=True, key_padding="bool", hint=True),
    Case(batch_first=False, causal=True, attn_mask="bool_heads"),
    Case(dtype="float32", causal=True, key_padding="bool"),
    Case(dtype="float32", layout="zigzag", attn_mask="bool", key_padding="bool"),
    Case(cross=True, key_padding="bool", batch_first=False),
    Case(cross=True, layout="zigzag", attn_mask="bool_heads"),
    Case(key_padding="float", attn_mask="float"),
    Case(dropout=0.3, layout="zigzag", causal=True),
    Case(dropout=0.3, key_padding="bool", attn_mask="float"),
    Case(unbatched=True, key_padding="bool", attn_mask="bool"),
    Case(model="encoder", layout="zigzag", causal=True, key_padding="bool"),
    Case(model="encoder", batch_first=False, attn_mask="bool", key_padding="bool"),
    Case(model="encoder", eval=True, key_padding="bool"),
]
CASES = _BASE + [dataclasses.replace(case, scheme="ulysses") for case in _BASE]
CASES_3 = [Case(layout="zigzag", causal=True, key_padding="bool"),
           Case(scheme="ulysses", attn_mask="bool", key_padding="bool", dtype="float32")]
WORLDS = [(1, case) for case in CASES] + [(2, case) for case in CASES] + [
    pytest.param(3, case, marks=pytest.mark.slow) for case in CASES_3]


@pytest.fixture(scope="module")
def outcomes():
    """{world size: [each rank's {case id: error or None}]}, each world run once, on first use."""
    cache = {}

    def get(world_size):
        if world_size not in cache:
            cases = CASES_3 if world_size == 3 else CASES
            cache[world_size] = run_on_ranks(world_size, "helpers.distributed_layers_cases:check_all", cases)
        return cache[world_size]
    return get


def _id(param):
    return param.id if isinstance(param, Case) else f"world{param}"


@pytest.mark.parametrize("world_size,case", WORLDS, ids=_id)
def test_matches_the_unsharded_layer_on_the_gathered_sequence(outcomes, world_size, case):
    errors = [f"rank {rank}:\n{result[case.id]}" for rank, result in enumerate(outcomes(world_size))
              if result[case.id] is not None]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("world_size", [1, 2])
def test_bad_masks_and_head_counts_raise_on_every_rank_naming_the_argument(outcomes, world_size):
    errors = [f"rank {rank}:\n{result['errors']}" for rank, result in enumerate(outcomes(world_size))
              if result["errors"] is not None]
    assert not errors, "\n".join(errors)


# In this process: what is decided before any collective.

def _layer(**kwargs):
    torch.manual_seed(0)
    return mha_ext.nn.MultiheadAttention(16, 4, batch_first=True, **kwargs)


def test_need_weights_is_refused_naming_the_argument():
    wrapper = SequenceParallel(_layer())
    x = torch.randn(2, 5, 16)
    with pytest.raises(LayerValueError, match="need_weights must be False") as error:
        wrapper(x, x, x, need_weights=True)
    assert isinstance(error.value, AssertionError) and isinstance(error.value, ValueError)


def test_needs_an_initialised_process_group():
    wrapper = SequenceParallel(_layer())
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrapper(x, x, x)


@pytest.mark.parametrize("arguments,error,message", [
    (dict(attention=torch.nn.MultiheadAttention(16, 4)), LayerTypeError, "replace_attention"),
    (dict(attention=torch.nn.Linear(2, 2)), LayerTypeError, "must be an mha_ext.nn.MultiheadAttention"),
    (dict(scheme="tree"), LayerValueError, "scheme must be one of"),
    (dict(layout="striped"), LayerValueError, "layout must be one of"),
    (dict(attention=mha_ext.nn.MultiheadAttention(16, 4, add_bias_kv=True)), LayerValueError, "add_bias_kv"),
    (dict(attention=mha_ext.nn.MultiheadAttention(16, 4, add_zero_attn=True)), LayerValueError, "add_zero_attn"),
])
def test_bad_construction_is_refused(arguments, error, message):
    arguments = {"attention": _layer(), **arguments}
    with pytest.raises(error, match=message):
        SequenceParallel(**arguments)


def test_state_dict_keys_are_the_layers_and_load_both_ways():
    layer, other = _layer(), _layer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    wrapper = SequenceParallel(layer, scheme="ulysses", layout="zigzag")
    assert list(wrapper.state_dict()) == list(layer.state_dict())
    wrapper.load_state_dict(other.state_dict(), strict=True)          # an unwrapped layer's checkpoint
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), other.parameters()))
    fresh = _layer()
    fresh.load_state_dict(wrapper.state_dict(), strict=True)          # the wrapper's into an unwrapped layer
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), other.parameters()))
    assert [p is q for p, q in zip(wrapper.parameters(), layer.parameters())] == [True] * len(list(layer.parameters()))


def test_reads_the_layers_attributes():
    layer = _layer()
    wrapper = SequenceParallel(layer)
    assert wrapper.attention is layer
    assert (wrapper.embed_dim, wrapper.num_heads, wrapper.batch_first) == (16, 4, True)
    assert wrapper.in_proj_weight is layer.in_proj_weight and wrapper.out_proj is layer.out_proj
    assert "scheme='ring', layout='contiguous'" in repr(wrapper)
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute


def _encoder():
    torch.manual_seed(0)
    layer = mha_ext.nn.replace_attention(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True))
    # Built after the swap: torch's check leaves its nested-tensor path on.
    return torch.nn.TransformerEncoder(layer, 2)


def test_sequence_parallel_wraps_every_layer_in_place_and_keeps_the_state_dict():
    model = _encoder()
    keys = list(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, mha_ext.nn.MultiheadAttention)]
    assert model.use_nested_tensor
    assert sequence_parallel(model, scheme="ulysses", layout="zigzag") is model
    wrappers = [layer.self_attn for layer in model.layers]
    assert all(isinstance(w, SequenceParallel) and (w.scheme, w.layout) == ("ulysses", "zigzag") for w in wrappers)
    assert [w.attention for w in wrappers] == layers
    assert list(model.state_dict()) == keys
    assert not model.use_nested_tensor   # its padding mask covers the whole sequence, not the shard
    assert sequence_parallel(model) is model   # a second call changes nothing
    assert [layer.self_attn for layer in model.layers] == wrappers and wrappers[0].scheme == "ulysses"


def test_sequence_parallel_wraps_a_shared_layer_once_under_every_name():
    layer = _layer()
    model = torch.nn.Module()
    model.first, model.second = layer, layer
    model.inner = torch.nn.Sequential(layer)
    sequence_parallel(model)
    assert isinstance(model.first, SequenceParallel)
    assert model.first is model.second is model.inner[0] and model.first.attention is layer


def test_sequence_parallel_of_a_layer_returns_its_wrapper():
    layer = _layer()
    wrapper = sequence_parallel(layer, layout="zigzag")
    assert isinstance(wrapper, SequenceParallel) and wrapper.attention is layer and wrapper.layout == "zigzag"
    assert sequence_parallel(wrapper) is wrapper


def test_sequence_parallel_refuses_torch_layers_and_changes_nothing():
    model = torch.nn.Sequential(_layer(), torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4)))
    with pytest.raises(LayerTypeError, match=r"1\.0.*replace_attention"):
        sequence_parallel(model)
    assert type(model[0]) is mha_ext.nn.MultiheadAttention
    with pytest.raises(LayerValueError, match="layout"):
        sequence_parallel(torch.nn.Sequential(_layer()), layout="striped")
