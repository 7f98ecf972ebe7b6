"""Sequence-parallel attention (mha_ext.distributed) on gloo process groups of local processes: ring and
all-to-all attention against the single-process op on the gathered tensors, outputs, LSE and every gradient,
for world sizes 1 to 4, every mask kind, causal in both alignments and layouts, GQA, Ev != E, uneven shards,
cross-attention lengths and dropout; bitwise reproducibility; errors that name the argument; a failing rank
fails the run instead of hanging. Each world size runs all its cases in one group (tests/helpers/distributed_cases.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mha_ext.distributed as mdist
from helpers.distributed import RankFailed, run_on_ranks
from helpers.distributed_cases import Case

_BASE = [
    Case(), Case(layout="zigzag"), Case(causal=True), Case(layout="zigzag", causal=True),
    Case(causal="lower_right", layout="zigzag"),
    Case(mask="key_padding"), Case(mask="bool_rows", causal=True), Case(mask="float_rows", causal=True),
    Case(mask="bias_heads", layout="zigzag", causal=True), Case(mask="bool_and_bias", twice=True),
    Case(dropout_p=0.3, mask="float_rows"), Case(dropout_p=0.3, layout="zigzag", causal=True, twice=True),
    Case(dtype="float32", mask="key_padding", causal=True), Case(dtype="bfloat16", layout="zigzag", causal=True),
    Case(heads=(2, 1), causal=True), Case(heads=(3, 1), E=5, Ev=11, mask="bool_and_bias"),
    Case(key_extra=5, mask="float_rows"), Case(chunk=1, extra=3), Case(chunk=0, extra=1),
    # Shards of more than 256 rows: the ring forward cuts its calls into row pieces.
    Case(chunk=150, mask="bool_and_bias"), Case(chunk=150, dropout_p=0.2, mask="key_padding"),
]
CASES = _BASE + [dataclasses.replace(case, scheme="ulysses") for case in _BASE]
WORLD_SIZES = [1, 2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def outcomes():
    """{world size: [each rank's {case id: error or None}]}, each world run once, on first use."""
    cache = {}

    def get(world_size):
        if world_size not in cache:
            cache[world_size] = run_on_ranks(world_size, "helpers.distributed_cases:check_all", CASES)
        return cache[world_size]
    return get


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_matches_the_single_process_op_on_the_gathered_tensors(outcomes, world_size, case):
    errors = [f"rank {rank}:\n{result[case.id]}" for rank, result in enumerate(outcomes(world_size))
              if result[case.id] is not None]
    assert not errors, "\n".join(errors)


def _raise_on_rank_one():
    import torch.distributed as dist

    q = torch.randn(1, 2, 4, 8)
    # Rank 1 passes a bad dropout_p and raises before the first collective; rank 0 waits in it.
    mdist.ring_attention(q, q, q, dropout_p=2.0 if dist.get_rank() == 1 else 0.0)


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_run_with_its_error():
    with pytest.raises(RankFailed, match=r"rank 1 of 2:(.|\n)*dropout_p must be in \[0, 1\], got 2.0"):
        run_on_ranks(2, "test_distributed:_raise_on_rank_one", timeout=60, collective_timeout=20)


def _bad_arguments():
    """Each bad call's error text, on every rank (the checks raise before or at the same collective everywhere)."""
    import torch.distributed as dist

    rank, errors = dist.get_rank(), []
    q = torch.randn(1, 4, 6, 8)

    def attempt(call):
        try:
            call()
        except (ValueError, TypeError) as error:
            errors.append(str(error))
        else:
            errors.append("no error")

    attempt(lambda: mdist.ring_attention(q, q, q, layout="striped"))
    attempt(lambda: mdist.ring_attention(q[..., :5 + rank, :], q, q, layout="zigzag"))
    attempt(lambda: mdist.ring_attention(q, q, q, attn_mask=torch.ones(6, 7, dtype=torch.bool)))
    attempt(lambda: mdist.ulysses_attention(q[:, :3], q[:, :3], q[:, :3]))
    attempt(lambda: mdist.ulysses_attention(q, q, q, attn_bias=torch.randn(4, 6, 5)))
    attempt(lambda: mdist.ring_attention(q, q, q[..., :5, :]))
    attempt(lambda: mdist.ring_attention(q[..., :4 + 2 * rank, :], q, q, is_causal=True))
    return errors


@pytest.mark.slow
def test_bad_arguments_raise_errors_that_name_them():
    errors = run_on_ranks(2, "test_distributed:_bad_arguments", timeout=120, collective_timeout=30)
    for rank_errors in errors:
        layout, zigzag, mask, heads, bias, lengths, causal = rank_errors
        assert "layout must be one of ('contiguous', 'zigzag'), got 'striped'" in layout
        assert "with layout='zigzag' every rank's query shard must have the same even length" in zigzag
        assert "got lengths [5, 6]" in zigzag
        assert "attn_mask must have this rank's query rows (dim -2: 6 or 1) and the whole key sequence " \
               "(dim -1: 12 or 1), got shape (6, 7)" in mask
        assert "query's head count (dim -3) must be a multiple of the group size 2, got shape (1, 3, 6, 8)" in heads
        assert "attn_bias must have the query's heads or 1 (dim -3: 4)" in bias and "got shape (4, 6, 5)" in bias
        assert "key and value must have the same sequence length (dim -2), got key 6 and value 5" in lengths
        assert "causal attention needs each block's diagonal to be its top-left or bottom-right corner" in causal


def test_without_an_initialised_group_the_error_says_so():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        mdist.ring_attention(q, q, q)


def _traffic(world_size_unused=None):
    import torch.distributed as dist

    q = torch.randn(1, 6, 6, 8)
    v = torch.randn(1, 6, 6, 3)
    with mdist.count_traffic() as ring:
        mdist.ring_attention(q, q, v)
    with mdist.count_traffic() as ulysses:
        mdist.ulysses_attention(q, q, v)
    return dist.get_world_size(), dataclasses.astuple(ring), dataclasses.astuple(ulysses)


@pytest.mark.slow
def test_traffic_is_one_key_value_block_per_step_and_one_all_to_all_each_way():
    for world_size, ring, ulysses in run_on_ranks(3, "test_distributed:_traffic", timeout=120):
        block = 6 * 6 * (8 + 3) * 4                  # one rank's key and value shards, float32 bytes
        assert ring[0] == (world_size - 1) * block     # forward: P - 1 shifts of a block
        # Ulysses sends (P - 1) / P of query, key, value (in) and of the output (back): 6*6*(8+8+3+3) floats.
        assert ulysses[0] == 6 * 6 * (8 + 8 + 3 + 3) * 4 * (world_size - 1) // world_size


def _shard_round_trip(layout):
    full = torch.arange(2 * 12 * 3, dtype=torch.float32).view(2, 12, 3)
    local = mdist.shard(full, -2, layout=layout)
    return local.tolist(), torch.equal(mdist.unshard(local, -2, layout=layout), full)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_and_unshard_are_inverse_and_zigzag_pairs_chunk_r_with_2p_minus_1_minus_r(layout):
    results = run_on_ranks(3, "test_distributed:_shard_round_trip", layout, timeout=120)
    assert all(round_trip for _, round_trip in results)
    full = torch.arange(2 * 12 * 3, dtype=torch.float32).view(2, 12, 3)
    rows = {"contiguous": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
            "zigzag": [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]}[layout]
    for (local, _), expected in zip(results, rows):
        assert local == full[:, expected].tolist()
