"""mha_ext.varlen_attention (packed sequences, FlashAttention's varlen layout) against the fp64 reference run on
each sequence alone: every length pattern (empty sequences, length 1, one sequence, no sequence, query and key
lengths differing per sequence), every mask kind in the padded layout, causal in both alignments, GQA, Ev != E,
every dtype, gradients (gradcheck in float64), dropout, the op face (opcheck, torch.compile), the thread
schedule, errors, and the CUDA kernels run by the emulator."""

from __future__ import annotations

import pytest
import torch

import mha_ext
from helpers.backends import EMULATED_CUDA, param
from helpers.cases import DTYPES, bool_mask, randn, tolerance
from helpers.reference import at_thread_counts, leaf, reference_attention

ops = torch.ops.mha_ext

# (query lengths, key lengths) per sequence; None: the same as the query's.
LENGTHS = {
    "uneven": ([5, 0, 1, 12, 7], None),
    "one_sequence": ([13], None),
    "all_length_1": ([1, 1, 1], None),
    "one_long_many_short": ([70, 1, 2, 3, 1, 4, 2], None),
    "cross_lengths": ([3, 4, 0, 9, 7], [6, 1, 5, 9, 0]),
    "no_sequence": ([], None),
}

# Masks in the padded layout (batch, H, max_q, max_k), with the per-sequence slice each stands for.
MASKS = {
    "none": {},
    "causal": dict(is_causal=True),
    "causal_lower_right": dict(is_causal="lower_right"),
    "bool_per_sequence": dict(attn_mask=("bool", "B1QK")),
    "key_padding": dict(attn_mask=("bool", "B11K")),
    "float_shared_grad": dict(attn_mask=("float", "1HQK")),
    "bias_per_sequence_and_bool": dict(attn_mask=("bool", "B1QK"), attn_bias=("float", "BHQK")),
    "bias_2d_causal": dict(attn_bias=("float", "QK"), is_causal=True),
    "bias_heads_lower_right": dict(attn_bias=("float", "HQK"), is_causal="lower_right"),
}


def make_case(lengths, mask, dtype, Hq=4, Hkv=2, E=8, Ev=12, seed=0, device="cpu"):
    q_lens, k_lens = LENGTHS[lengths]
    k_lens = q_lens if k_lens is None else k_lens
    gen = torch.Generator().manual_seed(seed)
    B, max_q, max_k = len(q_lens), max(q_lens, default=0), max(k_lens, default=0)
    sizes = dict(B=B, H=Hq, Q=max_q, K=max_k)
    args = dict(query=randn(gen, sum(q_lens), Hq, E, dtype=dtype), key=randn(gen, sum(k_lens), Hkv, E, dtype=dtype),
                value=randn(gen, sum(k_lens), Hkv, Ev, dtype=dtype),
                cu_seqlens_q=mha_ext.varlen.cu_seqlens(torch.tensor(q_lens, dtype=torch.int64)),
                cu_seqlens_k=mha_ext.varlen.cu_seqlens(torch.tensor(k_lens, dtype=torch.int64)).long(),
                max_seqlen_q=max_q, max_seqlen_k=max_k, enable_gqa=Hq != Hkv)
    for name, spec in MASKS[mask].items():
        if name == "is_causal":
            args[name] = spec
            continue
        kind, layout = spec
        shape = [sizes[d] if d in sizes else 1 for d in layout]
        args[name] = bool_mask(gen, *shape) if kind == "bool" else randn(gen, *shape, dtype=dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}, q_lens, k_lens


def part(padded, n, L, S):
    """Sequence n's slice [n, :, :L, :S] of a padded-layout mask (size-1 dims kept)."""
    if padded is None:
        return None
    t = padded.reshape((1,) * (4 - padded.dim()) + tuple(padded.shape))
    t = t[0 if t.size(0) == 1 else n]
    return t[:, :L if t.size(1) != 1 else 1, :S if t.size(2) != 1 else 1]


def reference(args, q_lens, k_lens):
    """(out (total_q, H, Ev), lse (H, total_q)) in float64: the reference on each sequence alone."""
    outs, lses = [], []
    q0 = k0 = 0
    for n, (L, S) in enumerate(zip(q_lens, k_lens)):
        def heads(t, start, length):
            return t[start:start + length].transpose(0, 1)
        out, lse = reference_attention(
            heads(args["query"], q0, L), heads(args["key"], k0, S), heads(args["value"], k0, S),
            attn_mask=part(args.get("attn_mask"), n, L, S), attn_bias=part(args.get("attn_bias"), n, L, S),
            is_causal=args.get("is_causal", False), return_lse=True)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
        q0, k0 = q0 + L, k0 + S
    H, Ev = max(args["query"].size(1), args["key"].size(1)), args["value"].size(2)
    out = torch.cat(outs) if outs else torch.zeros(0, H, Ev, dtype=torch.float64)
    lse = torch.cat(lses, dim=1) if lses else torch.zeros(H, 0, dtype=torch.float64)
    return out, lse


def floating_leaves(args):
    return {name: leaf(args[name]) for name in ("query", "key", "value", "attn_mask", "attn_bias")
            if isinstance(args.get(name), torch.Tensor) and args[name].is_floating_point()}


def forward_and_grads(args, grad_out):
    leaves = floating_leaves(args)
    out, lse = mha_ext.varlen_attention(**{**args, **leaves}, return_lse=True)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True) if leaves else ()
    return out, lse, dict(zip(leaves, grads))


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("mask", MASKS)
def test_forward_and_gradients_match_the_reference_per_sequence(lengths, mask):
    args, q_lens, k_lens = make_case(lengths, mask, torch.float64)
    grad_out = torch.randn(sum(q_lens), 4, 12, dtype=torch.float64)
    out, lse, grads = forward_and_grads(args, grad_out)
    leaves = floating_leaves(args)
    expected_out, expected_lse = reference({**args, **leaves}, q_lens, k_lens)
    torch.testing.assert_close(out, expected_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, expected_lse, atol=1e-10, rtol=1e-10)
    if grads:
        expected = (torch.autograd.grad(expected_out, list(leaves.values()), grad_out, allow_unused=True)
                    if expected_out.requires_grad else [None] * len(leaves))  # no sequence: no gradient
        for (name, grad), want in zip(grads.items(), expected):
            want = torch.zeros_like(leaves[name]) if want is None else want
            torch.testing.assert_close(grad, want, atol=1e-9, rtol=1e-9, msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["causal_lower_right", "bias_per_sequence_and_bool", "float_shared_grad"])
def test_every_dtype_within_its_tolerance(dtype, mask):
    args, q_lens, k_lens = make_case("one_long_many_short", mask, dtype, seed=1)
    grad_out = torch.randn(sum(q_lens), 4, 12).to(dtype)
    out, lse, grads = forward_and_grads(args, grad_out)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = {name: leaf(t.double()) for name, t in floating_leaves(args).items()}
    expected_out, expected_lse = reference({**args, **leaves}, q_lens, k_lens)
    torch.testing.assert_close(out.double(), expected_out, **tolerance(dtype, expected_out))
    torch.testing.assert_close(lse.double(), expected_lse, **tolerance(dtype, expected_lse))
    expected = torch.autograd.grad(expected_out, list(leaves.values()), grad_out.double())
    for (name, grad), want in zip(grads.items(), expected):
        assert grad.dtype == args[name].dtype, name
        torch.testing.assert_close(grad.double(), want, **tolerance(dtype, want), msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("mask", ["float_shared_grad", "bias_per_sequence_and_bool", "causal_lower_right"])
def test_gradcheck_float64(mask):
    args, _, _ = make_case("uneven", mask, torch.float64, Hq=2, Hkv=1, E=4, Ev=3, seed=2)
    leaves = floating_leaves(args)
    names = list(leaves)

    def run(*tensors):
        return mha_ext.varlen_attention(**{**args, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(run, tuple(leaves.values()))


def test_each_sequence_equals_the_dense_op_on_it_alone():
    # Same kernels, same tiles: a packed sequence gives the bits the dense op gives on that sequence.
    args, q_lens, _ = make_case("one_long_many_short", "causal_lower_right", torch.float32, seed=3)
    out, lse = mha_ext.varlen_attention(**args, return_lse=True)
    q0 = 0
    for L in q_lens:
        def heads(t):
            return t[q0:q0 + L].transpose(0, 1).contiguous()
        dense, dense_lse = mha_ext.scaled_dot_product_attention(
            heads(args["query"]), heads(args["key"]), heads(args["value"]), is_causal="lower_right",
            enable_gqa=True, return_lse=True)
        torch.testing.assert_close(out[q0:q0 + L].transpose(0, 1), dense, atol=0, rtol=0)
        torch.testing.assert_close(lse[:, q0:q0 + L], dense_lse, atol=0, rtol=0)
        q0 += L


def test_same_bits_at_every_thread_count_and_on_every_run():
    # One long sequence runs on all threads, the short ones side by side: the schedule must not show.
    args, q_lens, _ = make_case("one_long_many_short", "bias_per_sequence_and_bool", torch.float32, seed=4)
    grad_out = torch.randn(sum(q_lens), 4, 12)

    def run():
        out, lse, grads = forward_and_grads(args, grad_out)
        return [out, lse, *grads.values()]

    first, second = at_thread_counts(run)
    for a, b in zip(first + run(), second + first):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_short_sequences_run_side_by_side_under_inference_mode(mode):
    # The threads that run short sequences side by side allocate and copy tensors: they must share the
    # caller's inference mode (an inference tensor updated outside it raises).
    args, q_lens, k_lens = make_case("one_long_many_short", "causal", torch.float32, seed=9)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        with mode():
            out = mha_ext.varlen_attention(**args)
    finally:
        torch.set_num_threads(threads)
    expected, _ = reference(args, q_lens, k_lens)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_dropout_decides_by_packed_row_and_column():
    # Each sequence decides as the slice [seed, offset, q_start, k_start, 0, H] of one call: its decisions do
    # not depend on the other sequences, and the backward regenerates them.
    args, q_lens, k_lens = make_case("cross_lengths", "bias_per_sequence_and_bool", torch.float64, seed=5)
    del args["enable_gqa"]
    causal = "none"
    rng_state = torch.tensor([1234, 5678])
    q, k, v = (leaf(args[name]) for name in ("query", "key", "value"))
    packed = (q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"],
              args["attn_mask"], args["attn_bias"], causal, 0.5, 0.4, rng_state)
    out, _ = ops.varlen_attention_forward(*packed)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q0 = k0 = 0
    for n, (L, S) in enumerate(zip(q_lens, k_lens)):
        def heads(t, start, length):
            return t[start:start + length].transpose(0, 1)
        sq, sk, sv = leaf(heads(q, q0, L)), leaf(heads(k, k0, S)), leaf(heads(v, k0, S))
        state = torch.tensor([1234, 5678, q0, k0, 0, 4])
        dense, _ = ops.attention_forward(sq, sk, sv, part(args["attn_mask"], n, L, S),
                                         part(args["attn_bias"], n, L, S), causal, 0.5, 0.4, state)
        torch.testing.assert_close(heads(out, q0, L), dense, atol=0, rtol=0)
        if L and S:
            dense_grads = torch.autograd.grad(dense, (sq, sk, sv), heads(grad_out, q0, L))
            for packed_grad, dense_grad, start, length in zip(grads, dense_grads, (q0, k0, k0), (L, S, S)):
                torch.testing.assert_close(heads(packed_grad, start, length), dense_grad, atol=1e-12, rtol=1e-12)
        q0, k0 = q0 + L, k0 + S
    # Half the probabilities dropped is visible: the output differs from the run without dropout.
    no_dropout, _ = ops.varlen_attention_forward(*packed[:-2], 0.0, None)
    assert not torch.allclose(out, no_dropout)


def test_opcheck():
    args, _, _ = make_case("uneven", "bias_per_sequence_and_bool", torch.float32, seed=6)
    positional = (args["query"], args["key"], args["value"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                  args["max_seqlen_q"], args["max_seqlen_k"])
    q, k, v = (t.requires_grad_(True) for t in positional[:3])
    bias = args["attn_bias"].requires_grad_(True)
    forward = (q, k, v, *positional[3:], args["attn_mask"], bias, "lower_right", 0.3)
    torch.library.opcheck(ops.varlen_attention_forward, forward)
    torch.library.opcheck(ops.varlen_attention_forward, forward + (0.2, torch.tensor([3, 4])))
    out, lse = ops.varlen_attention_forward(*forward)
    torch.library.opcheck(ops.varlen_attention_backward,
                          (torch.randn_like(out), out.detach(), lse.detach(), torch.randn_like(lse), False, True,
                           *(t.detach() for t in forward[:3]), *forward[3:8], bias.detach(), *forward[9:]))


def test_compiles_without_graph_breaks_forward_and_backward():
    args, q_lens, _ = make_case("uneven", "bias_2d_causal", torch.float32, seed=7)
    leaves = floating_leaves(args)

    def step(query, key, value, attn_bias):
        out = mha_ext.varlen_attention(query, key, value, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                       args["max_seqlen_q"], args["max_seqlen_k"], attn_bias=attn_bias,
                                       is_causal=True, enable_gqa=True)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaves = {name: leaf(t) for name, t in leaves.items()}
    compiled(**leaves).backward()
    step(**eager_leaves).backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, eager_leaves[name].grad, atol=1e-6, rtol=1e-6)


def test_pack_unpack_and_cu_seqlens():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])  # right, left, empty, holes
    padded = torch.randn(4, 4, 3, requires_grad=True)
    packed, cu, max_len = mha_ext.varlen.pack(padded, mask)
    assert cu.tolist() == [0, 3, 5, 5, 7] and cu.dtype == torch.int32 and max_len == 3
    torch.testing.assert_close(packed, padded[mask.bool()])
    back = mha_ext.varlen.unpack(packed, mask)
    torch.testing.assert_close(back, padded * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(padded.grad, mask[..., None].expand(4, 4, 3).float())


@pytest.mark.parametrize("change, match", [
    (dict(cu_seqlens_q=torch.tensor([1, 5, 5, 6, 18, 25])), "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 6, 18, 25])), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 5, 6, 18, 24])), "cu_seqlens_k must end at key's total tokens"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 6, 18, 25])), "the same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 25.0])), "cu_seqlens_q must be int32 or int64"),
    (dict(cu_seqlens_q=torch.tensor([[0, 25]])), "cu_seqlens_q must be 1-D"),
    (dict(max_seqlen_q=11), "sequence 3 has 12 tokens .cu_seqlens_q., more than max_seqlen_q = 11"),
    (dict(max_seqlen_k=2.5), "max_seqlen_k must be an int or None"),
    (dict(query=torch.randn(25, 4)), r"query must be packed as \(total_tokens, heads, head_dim\)"),
    (dict(attn_mask=torch.ones(4, 1, 12, 12, dtype=torch.bool)), r"attn_mask must broadcast to \(batch, H"),
    (dict(attn_bias=torch.ones(5, 4, 12, 13)), r"attn_bias must broadcast to \(batch, H, max_seqlen_q, max_seqlen_k\) = \(5, H, 12, 12\)"),
    (dict(attn_mask=torch.nn.attention.bias.causal_lower_right(12, 12)), "takes causality as is_causal"),
    (dict(enable_gqa=False), "pass enable_gqa=True"),
])
def test_errors_name_the_argument(change, match):
    args, _, _ = make_case("uneven", "none", torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        mha_ext.varlen_attention(**{**args, **change})


def test_dropout_rng_state_must_be_a_seed_and_offset():
    args, _, _ = make_case("uneven", "none", torch.float32, Hkv=4)
    positional = [args[name] for name in ("query", "key", "value", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                          "max_seqlen_k")]
    with pytest.raises(ValueError, match=r"needs rng_state, an int64 tensor \[seed, offset\], got Long of shape \(6,\)"):
        ops.varlen_attention_forward(*positional, None, None, "none", 1.0, 0.5, torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("backend, mask", [param(EMULATED_CUDA, mask) for mask in
                                           ("causal_lower_right", "bias_per_sequence_and_bool", "float_shared_grad")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernels_emulated_match_the_cpu(backend, mask, dtype):
    args, q_lens, _ = make_case("one_long_many_short", mask, dtype, Hq=4, Hkv=2, E=16, Ev=16, seed=8)
    grad_out = torch.randn(sum(q_lens), 4, 16).to(dtype)
    cpu = forward_and_grads(args, grad_out)
    with backend.active():
        emulated = forward_and_grads(args, grad_out)
    for expected, actual in [(cpu[0], emulated[0]), (cpu[1], emulated[1])] + [
            (cpu[2][name], emulated[2][name]) for name in cpu[2]]:
        torch.testing.assert_close(actual.double(), expected.double(), **tolerance(dtype, expected.double()))
