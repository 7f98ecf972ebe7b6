"""What each rank runs in the sequence-parallel layer tests (tests/test_distributed_layers.py): build a layer (or a
small nn.TransformerEncoder) and its full inputs from a seed every rank shares, run it unsharded on the whole
sequence, run it wrapped by mha_ext.distributed (SequenceParallel / sequence_parallel) on this rank's shards, and
compare the output, the inputs' and the floating masks' gradients with the unsharded run's shards, and every
parameter's gradient summed over the ranks (in rank order) with the unsharded run's."""

from __future__ import annotations

import copy
import dataclasses
import traceback

import torch
import torch.distributed as dist

import mha_ext.nn
from mha_ext.distributed import SequenceParallel, sequence_parallel, shard
from mha_ext.errors import LayerValueError

from .distributed_cases import assert_close_as, case_id, sum_over_ranks

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    scheme: str = "ring"            # "ring" or "ulysses"
    layout: str = "contiguous"
    dtype: str = "float64"
    batch_first: bool = True
    model: str = "layer"            # "layer": SequenceParallel(MultiheadAttention); "encoder": sequence_parallel
    cross: bool = False             # key/value of another length and width (kdim, vdim) than the query
    unbatched: bool = False         # 2-D inputs (L, E)
    key_padding: str = "none"       # none, bool (True = ignore), float (added, with a gradient)
    attn_mask: str = "none"         # none, bool (L, S), bool_heads (N * H, L, S), float (L, S) with a gradient
    causal: bool = False            # is_causal=True: global causality (the reference gets the causal mask)
    hint: bool = False              # with causal: also pass the causal mask's rows, as nn.Transformer* layers do
    dropout: float = 0.0
    eval: bool = False              # eval mode under torch.no_grad (torch's fused inference paths must stay off)
    heads: int = 2                  # per rank (ulysses splits them over the ranks)
    chunk: int = 3                  # positions per (rank, zigzag chunk)
    extra: int = 1                  # positions added in the contiguous layout: uneven shards

    @property
    def id(self) -> str:
        return case_id(self)


class _Setup:
    """The case's model, full inputs, full masks and output gradient, the same on every rank."""

    def __init__(self, case: Case, seed: int):
        world = dist.get_world_size()
        self.case, self.dtype = case, DTYPES[case.dtype]
        generator = torch.Generator().manual_seed(1000 + seed)
        heads = case.heads * world
        embed = 4 * heads
        contiguous = case.layout == "contiguous"
        self.L = 2 * world * case.chunk + (case.extra if contiguous else 0)
        self.S = 2 * world * (case.chunk + 1) + (2 if contiguous else 0) if case.cross else self.L
        kdim, vdim = (embed + 3, embed - 2) if case.cross else (embed, embed)
        N = 2

        torch.manual_seed(seed)
        if case.model == "layer":
            self.model = mha_ext.nn.MultiheadAttention(embed, heads, dropout=case.dropout, kdim=kdim, vdim=vdim,
                                                       batch_first=case.batch_first, dtype=self.dtype)
        else:
            layer = torch.nn.TransformerEncoderLayer(embed, heads, dim_feedforward=2 * embed, dropout=case.dropout,
                                                     batch_first=case.batch_first, dtype=self.dtype)
            self.model = mha_ext.nn.replace_attention(torch.nn.TransformerEncoder(layer, 2,
                                                                                  enable_nested_tensor=False))
        self.model.train(not case.eval)
        self.parameter_names = [name for name, _ in self.model.named_parameters()]
        self.heads, self.N = heads, N

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(self.dtype)

        def tokens(length, width):
            if case.unbatched:
                return randn(length, width)
            return randn(N, length, width) if case.batch_first else randn(length, N, width)

        self.seq_dim = 1 if case.batch_first and not case.unbatched else 0
        self.query = tokens(self.L, embed)
        self.key, self.value = (tokens(self.S, kdim), tokens(self.S, vdim)) if case.cross else (None, None)
        self.grad_out = tokens(self.L, embed)

        padding_shape = (self.S,) if case.unbatched else (N, self.S)
        if case.key_padding == "bool":
            lengths = torch.randint(1, self.S + 1, padding_shape[:-1] + (1,), generator=generator)
            self.key_padding_mask = torch.arange(self.S) >= lengths
        elif case.key_padding == "float":
            self.key_padding_mask = randn(*padding_shape)
        else:
            self.key_padding_mask = None
        rows = (N * heads, self.L, self.S) if case.attn_mask == "bool_heads" else (self.L, self.S)
        if case.attn_mask in ("bool", "bool_heads"):
            self.attn_mask = torch.rand(*rows, generator=generator) < 0.3
        elif case.attn_mask == "float":
            self.attn_mask = randn(*rows)
        else:
            self.attn_mask = None
        self.causal_mask = torch.ones(self.L, self.S, dtype=torch.bool).triu(1) if case.causal else None

    def reference_mask(self):
        """The whole attn_mask the unsharded layer gets: the case's mask, with the causal one merged in."""
        if self.causal_mask is None:
            return self.attn_mask
        if self.attn_mask is None:
            return self.causal_mask
        if self.attn_mask.dtype == torch.bool:
            return self.attn_mask | self.causal_mask
        return self.attn_mask.masked_fill(self.causal_mask, float("-inf"))


def _leaf(tensor, grad=True):
    return None if tensor is None else tensor.detach().clone().requires_grad_(grad)


def _call(setup: _Setup, model, query, key, value, key_padding_mask, attn_mask, is_causal):
    case = setup.case
    if case.model == "layer":
        out, weights = model(query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                             attn_mask=attn_mask, is_causal=is_causal)
        assert weights is None
        return out
    return model(query, mask=attn_mask, src_key_padding_mask=key_padding_mask, is_causal=is_causal)


def _run(setup: _Setup, model, inputs: dict, grad_out, is_causal, seed):
    """The model's output and the gradients of every input and parameter that requires one."""
    case = setup.case
    query = inputs["query"]
    key = query if inputs["key"] is None else inputs["key"]
    value = query if inputs["value"] is None else inputs["value"]
    torch.manual_seed(seed + 7)   # dropout: the same draws in both runs
    if case.eval:
        with torch.no_grad():
            return _call(setup, model, query, key, value, inputs["key_padding_mask"], inputs["attn_mask"],
                         is_causal), {}
    out = _call(setup, model, query, key, value, inputs["key_padding_mask"], inputs["attn_mask"], is_causal)
    wanted = {name: t for name, t in inputs.items() if t is not None and t.requires_grad}
    # Named as in the unwrapped model (the wrapper's names have ".attention" in them), in the same order.
    wanted.update({f"parameter {name}": p for name, p in zip(setup.parameter_names, model.parameters())})
    grads = torch.autograd.grad(out, list(wanted.values()), grad_out, allow_unused=True)
    return out.detach(), {name: g for name, g in zip(wanted, grads)}


def check(case: Case, seed: int = 0) -> None:
    setup = _Setup(case, seed)
    dtype, layout, dim = setup.dtype, case.layout, setup.seq_dim
    floating = {"key_padding_mask": case.key_padding == "float", "attn_mask": case.attn_mask == "float"}
    full = {"query": _leaf(setup.query), "key": _leaf(setup.key), "value": _leaf(setup.value),
            "key_padding_mask": _leaf(setup.key_padding_mask, floating["key_padding_mask"]),
            "attn_mask": _leaf(setup.reference_mask(), floating["attn_mask"])}
    # The reference: the unsharded model on the whole sequence, causality in its attn_mask.
    reference = copy.deepcopy(setup.model)
    ref_out, ref_grads = _run(setup, reference, full, setup.grad_out, False, seed)

    if case.model == "layer":
        model = SequenceParallel(setup.model, scheme=case.scheme, layout=layout)
    else:
        model = sequence_parallel(setup.model, scheme=case.scheme, layout=layout)
    # Sharded: is_causal means global causality; with the hint, the causal mask's rows come along.
    local_mask = setup.reference_mask() if case.hint else setup.attn_mask
    local = {name: None if setup_tensor is None else _leaf(shard(setup_tensor, dim, layout=layout))
             for name, setup_tensor in (("query", setup.query), ("key", setup.key), ("value", setup.value))}
    local["key_padding_mask"] = _leaf(setup.key_padding_mask, floating["key_padding_mask"])
    local["attn_mask"] = None if local_mask is None else _leaf(shard(local_mask, -2, layout=layout),
                                                               floating["attn_mask"])
    out, grads = _run(setup, model, local, shard(setup.grad_out, dim, layout=layout), case.causal, seed)

    grad_scale = 100.0 if dtype == torch.float64 else 10.0
    assert_close_as("output", out, shard(ref_out, dim, layout=layout), dtype)
    assert grads.keys() == ref_grads.keys(), (sorted(grads), sorted(ref_grads))
    for name, grad in grads.items():
        expected = ref_grads[name]
        if grad is None or expected is None:
            assert grad is None and expected is None, f"grad {name}: {grad} against {expected}"
        elif name in ("query", "key", "value"):
            assert_close_as(f"grad {name}", grad, shard(expected, dim, layout=layout), dtype, grad_scale)
        elif name == "attn_mask":   # this rank's rows: their gradient
            assert_close_as(f"grad {name}", grad, shard(expected, -2, layout=layout), dtype, grad_scale)
        else:                       # parameters and the key padding mask: the ranks' parts sum to the gradient
            assert_close_as(f"grad {name} summed over the ranks", sum_over_ranks(grad), expected, dtype, grad_scale)


def _raises(error, match, call):
    try:
        call()
    except error as caught:
        assert match in str(caught), f"{match!r} not in {str(caught)!r}"
        return
    raise AssertionError(f"no {error.__name__} raised (expected one saying {match!r})")


def check_errors() -> None:
    """Wrong mask shapes and head counts raise the layer's errors on every rank, naming the argument (every rank
    raises alike, so none is left waiting in a collective)."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    wrapper = SequenceParallel(mha_ext.nn.MultiheadAttention(8, 2, batch_first=True))
    x = shard(torch.randn(2, 4 * world, 8), 1)
    length = 4 * world
    if world > 1:   # the masks' shards instead of the whole key sequence / this rank's rows
        padding = shard(torch.zeros(2, length, dtype=torch.bool), 1)
        _raises(LayerValueError, f"key_padding_mask must have shape (2, {length})",
                lambda: wrapper(x, x, x, key_padding_mask=padding))
        _raises(LayerValueError, f"attn_mask must have shape (4, {length})",
                lambda: wrapper(x, x, x, attn_mask=torch.zeros(length, length, dtype=torch.bool)))
    _raises(LayerValueError, "need_weights must be False", lambda: wrapper(x, x, x, need_weights=True))
    ulysses = SequenceParallel(mha_ext.nn.MultiheadAttention(6 * world + 3, 2 * world + 1), scheme="ulysses")
    y = torch.randn(4, 2, 6 * world + 3)
    if world > 1:
        _raises(LayerValueError, "head count", lambda: ulysses(y, y, y))


EXTRA_CHECKS = {"errors": check_errors}


def check_all(cases: list[Case]) -> dict[str, str | None]:
    """{case id (or name of an extra check): None, or the error it raised} on this rank."""
    checks = [(case.id, lambda case=case, index=index: check(case, seed=index)) for index, case in enumerate(cases)]
    results = {}
    for name, run in checks + list(EXTRA_CHECKS.items()):
        try:
            run()
            results[name] = None
        except Exception:  # noqa: BLE001  (each case's failure reported on its own)
            results[name] = traceback.format_exc()
    return results
