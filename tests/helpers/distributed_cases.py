"""What each rank runs in the sequence-parallel tests (tests/test_distributed.py): build the full inputs from a
seed every rank shares, run the single-process op on them, run ring_attention / ulysses_attention on this rank's
shards, and compare outputs, LSE and every gradient with the single-process op's shards."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import mha_ext
from mha_ext.distributed import ring_attention, shard, ulysses_attention

from .reference import TOLERANCES

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    scheme: str = "ring"            # "ring" or "ulysses"
    layout: str = "contiguous"
    dtype: str = "float64"
    mask: str = "none"              # none, key_padding, bool_rows, float_rows, bias_heads, bool_and_bias
    causal: object = False
    heads: tuple = (2, 2)           # (Hq, Hkv), each multiplied by the world size
    E: int = 8
    Ev: int = 8
    chunk: int = 3                  # positions per (rank, zigzag chunk)
    extra: int = 1                  # positions added to contiguous layouts: uneven shards
    key_extra: int = 0              # S - L (no causal)
    dropout_p: float = 0.0
    twice: bool = False             # also check that a second run gives the same bits

    @property
    def id(self) -> str:
        return case_id(self)


def case_id(case) -> str:
    """A dataclass case's fields that differ from their defaults: "name=value,..." (pytest ids, result keys)."""
    fields = [f"{f.name}={getattr(case, f.name)}" for f in dataclasses.fields(case)
              if getattr(case, f.name) != f.default]
    return ",".join(fields) or "default"


def _masks(case: Case, B, H, L, S, dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    def keep(*shape):
        return torch.rand(*shape, generator=generator) > 0.3

    if case.mask == "none":
        return None, None
    if case.mask == "key_padding":      # (B, 1, 1, S), bool True = attend
        lengths = torch.randint(1, S + 1, (B,), generator=generator)
        return (torch.arange(S) < lengths[:, None]).view(B, 1, 1, S), None
    if case.mask == "bool_rows":        # (L, S), broadcast over batch and heads
        return keep(L, S), None
    if case.mask == "float_rows":       # (B, 1, L, S) floating mask with a gradient
        return randn(B, 1, L, S).requires_grad_(), None
    if case.mask == "bias_heads":       # (1, H, L, S) bias with a gradient, no mask
        return None, randn(1, H, L, S).requires_grad_()
    if case.mask == "bool_and_bias":    # (B, H, L, S) bool mask and a (H, 1, S) bias with a gradient
        return keep(B, H, L, S), randn(H, 1, S).requires_grad_()
    raise ValueError(case.mask)


def _shard_mask(mask, layout):
    if mask is None or mask.dim() < 2 or mask.size(-2) == 1:
        return None if mask is None else mask.detach().requires_grad_(mask.requires_grad)
    return shard(mask.detach(), -2, layout=layout).clone().requires_grad_(mask.requires_grad)


def sum_over_ranks(tensor):
    """Every rank's tensor summed in rank order: the same bits on every rank, whatever the timing."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def assert_close_as(name, actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")


def _run(case: Case, function, inputs, grad_out, seed):
    leaves = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in inputs.items()
              if t is not None}
    args = {name: leaves.get(name) for name in inputs}
    torch.manual_seed(seed)
    out, lse = function(**args, is_causal=case.causal, dropout_p=case.dropout_p, return_lse=True)
    wanted = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out)
    named = {name: g for (name, t), g in zip([(n, t) for n, t in leaves.items() if t.requires_grad], grads)}
    return out.detach(), lse.detach(), named


def check(case: Case, seed: int = 0) -> None:
    world = dist.get_world_size()
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(1000 + seed)
    B, Hq, Hkv = 2, case.heads[0] * world, case.heads[1] * world
    contiguous = case.layout == "contiguous"
    L = 2 * world * case.chunk + (case.extra if contiguous else 0)
    S = L + (case.key_extra if not case.causal else 0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

    full = {"query": randn(B, Hq, L, case.E), "key": randn(B, Hkv, S, case.E), "value": randn(B, Hkv, S, case.Ev)}
    full["attn_mask"], full["attn_bias"] = _masks(case, B, Hq, L, S, dtype, generator)
    grad_out = torch.randn(B, Hq, L, case.Ev, generator=generator, dtype=torch.float64).to(dtype)

    def single(**kw):
        return mha_ext.scaled_dot_product_attention(**kw, enable_gqa=True)

    ref_out, ref_lse, ref_grads = _run(case, single, full, grad_out, seed)

    function = ring_attention if case.scheme == "ring" else ulysses_attention

    def sharded(**kw):
        return function(**kw, enable_gqa=True, layout=case.layout)

    local = {name: shard(t.detach(), -2, layout=case.layout).clone().requires_grad_() if name in ("query", "key", "value")
             else _shard_mask(t, case.layout) for name, t in full.items()}
    local_grad_out = shard(grad_out, -2, layout=case.layout)
    out, lse, grads = _run(case, sharded, local, local_grad_out, seed)
    grad_scale = 10.0 if dtype != torch.float64 else 100.0

    assert_close_as("output", out, shard(ref_out, -2, layout=case.layout), dtype)
    assert_close_as("lse", lse, shard(ref_lse.unsqueeze(-1), -2, layout=case.layout).squeeze(-1), torch.float32
           if dtype != torch.float64 else dtype)
    for name in ("query", "key", "value"):
        assert_close_as(f"grad {name}", grads[name], shard(ref_grads[name], -2, layout=case.layout), dtype, grad_scale)
    for name in ("attn_mask", "attn_bias"):
        if name not in ref_grads:
            continue
        mask = local[name]
        if mask.dim() >= 2 and mask.size(-2) != 1:   # this rank's rows: its part is their gradient
            assert_close_as(f"grad {name}", grads[name], shard(ref_grads[name], -2, layout=case.layout), dtype, grad_scale)
        else:                                        # broadcast rows: the ranks' parts sum to the gradient
            assert_close_as(f"grad {name}", sum_over_ranks(grads[name]), ref_grads[name], dtype, grad_scale)
    if case.twice:
        again = _run(case, sharded, local, local_grad_out, seed)
        assert torch.equal(again[0], out) and torch.equal(again[1], lse), "a second run gave other output bits"
        for name in grads:
            assert torch.equal(again[2][name], grads[name]), f"a second run gave other bits for grad {name}"


def check_all(cases: list[Case]) -> dict[str, str | None]:
    """{case id: None, or the error it raised} on this rank."""
    import traceback

    results = {}
    for index, case in enumerate(cases):
        try:
            check(case, seed=index)
            results[case.id] = None
        except Exception:  # noqa: BLE001  (each case's failure reported on its own)
            results[case.id] = traceback.format_exc()
    return results
