"""mha_ext.nn.MultiheadAttention against torch.nn.MultiheadAttention (the reference, run in float64)."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import mha_ext
import mha_ext.nn

N, L, S, E, H = 3, 7, 5, 30, 3  # odd sizes; head_dim 10
KDIM, VDIM = 11, 13
ATOL = RTOL = 2e-5


def make_pair(seed, **kwargs):
    """An mha_ext layer and a float64 torch reference holding the same (randomised) weights."""
    torch.manual_seed(seed)
    ours = mha_ext.nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():  # torch zero-initialises the biases, which would hide bias bugs
            p.add_(0.2 * torch.randn_like(p))
    ref = torch.nn.MultiheadAttention(E, H, **kwargs).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def make_inputs(gen, kind, layout, kdim=E, vdim=E):
    """query, key, value (with the identities the layer looks at) for one layout."""
    s = L if kind == "self" else S

    def x(seq, dim):
        shape = (seq, dim) if layout == "unbatched" else (N, seq, dim) if layout == "batch_first" else (seq, N, dim)
        return torch.randn(shape, generator=gen)

    query = x(L, E)
    if kind == "self":
        return query, query, query
    if kind == "kv_same":
        key = x(s, kdim)
        return query, key, key
    return query, x(s, kdim), x(s, vdim)


def make_key_padding_mask(gen, kind, s, unbatched):
    if kind is None:
        return None
    shape = (s,) if unbatched else (N, s)
    ignore = torch.rand(shape, generator=gen) < 0.25
    if kind == "bool":
        return ignore
    return torch.randn(shape, generator=gen).masked_fill(ignore, float("-inf"))


def make_attn_mask(gen, kind, s, batch):
    """torch-convention attn_mask; query row 1 is fully masked so empty rows are exercised."""
    if kind is None:
        return None
    dtype, dims = kind[:-2], kind[-2:]
    shape = (L, s) if dims == "2d" else (batch * H, L, s)
    ignore = torch.rand(shape, generator=gen) < 0.25
    ignore[..., 1, :] = True
    if dtype == "bool":
        return ignore
    return torch.randn(shape, generator=gen).masked_fill(ignore, float("-inf"))


def to_double(t):
    return None if t is None or t.dtype == torch.bool else t.double()


def run_both(ours, ref, q, k, v, **kwargs):
    """Run both layers, keeping the query/key/value identities for the float64 copy."""
    qd = q.double()
    kd = qd if k is q else k.double()
    vd = kd if v is k else v.double()
    ref_kwargs = dict(kwargs)
    for name in ("key_padding_mask", "attn_mask"):
        m = kwargs.get(name)
        if m is not None and m.is_floating_point():
            ref_kwargs[name] = m.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "mismatched mask types" deprecation warning
        expected = ref(qd, kd, vd, **ref_kwargs)
    actual = ours(q, k, v, **kwargs)
    return actual, expected


def assert_matches(actual, expected, min_valid=0.5):
    """Compare where torch is finite (it gives NaN for rows with nothing to attend); ours must never be NaN."""
    assert torch.isfinite(actual).all()
    valid = torch.isfinite(expected)
    assert valid.float().mean() >= min_valid, "test inputs mask too much to compare"
    torch.testing.assert_close(actual[valid].double(), expected[valid], atol=ATOL, rtol=RTOL)


MASK_CASES = list(
    itertools.product(
        ["seq_first", "batch_first", "unbatched"],
        [None, "bool", "float"],
        [None, "bool2d", "float2d", "bool3d", "float3d"],
        [(False, True), (True, True), (True, False)],  # (need_weights, average_attn_weights)
    )
)


@pytest.mark.parametrize("layout,kpm_kind,mask_kind,weights", MASK_CASES)
def test_masks_match_torch(layout, kpm_kind, mask_kind, weights):
    need_weights, average = weights
    seed = MASK_CASES.index((layout, kpm_kind, mask_kind, weights))
    gen = torch.Generator().manual_seed(seed)
    ours, ref = make_pair(seed, batch_first=layout == "batch_first")
    q, k, v = make_inputs(gen, "kv_same", layout)
    unbatched = layout == "unbatched"
    kpm = make_key_padding_mask(gen, kpm_kind, S, unbatched)
    mask = make_attn_mask(gen, mask_kind, S, 1 if unbatched else N)
    (out, w), (ref_out, ref_w) = run_both(
        ours, ref, q, k, v, key_padding_mask=kpm, attn_mask=mask,
        need_weights=need_weights, average_attn_weights=average,
    )
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert_matches(out, ref_out)
    if not need_weights:
        assert w is None and ref_w is None
        return
    assert w.shape == ref_w.shape
    assert_matches(w, ref_w, min_valid=0.4)
    if mask_kind is not None and mask_kind.endswith("2d"):
        # query row 1 attends nothing: torch gives NaN, we give zeros
        row = w[..., 1, :]
        assert torch.equal(row, torch.zeros_like(row))


CONFIG_CASES = list(
    itertools.product(
        ["seq_first", "batch_first", "unbatched"],
        ["self", "kv_same", "separate", "kvdim"],
        [(False, False), (True, False), (False, True), (True, True)],  # (add_bias_kv, add_zero_attn)
        [True, False],  # bias
    )
)


@pytest.mark.parametrize("layout,kind,extras,bias", CONFIG_CASES)
def test_configurations_match_torch(layout, kind, extras, bias):
    add_bias_kv, add_zero_attn = extras
    seed = 1000 + CONFIG_CASES.index((layout, kind, extras, bias))
    gen = torch.Generator().manual_seed(seed)
    dims = dict(kdim=KDIM, vdim=VDIM) if kind == "kvdim" else {}
    ours, ref = make_pair(
        seed, batch_first=layout == "batch_first", bias=bias,
        add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, **dims,
    )
    q, k, v = make_inputs(gen, "separate" if kind == "kvdim" else kind, layout, **dims)
    s = k.shape[-2] if layout in ("unbatched", "batch_first") else k.shape[0]
    unbatched = layout == "unbatched"
    kpm = make_key_padding_mask(gen, "bool", s, unbatched)
    mask = make_attn_mask(gen, "float3d", s, 1 if unbatched else N)
    (out, w), (ref_out, ref_w) = run_both(
        ours, ref, q, k, v, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=False,
    )
    assert_matches(out, ref_out)
    assert_matches(w, ref_w, min_valid=0.4)
    (out, _), (ref_out, _) = run_both(ours, ref, q, k, v, need_weights=False)
    assert_matches(out, ref_out, min_valid=1.0)


@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("extras", [(False, False), (True, True)])
def test_is_causal_matches_torch(layout, need_weights, with_kpm, extras):
    layout_index = ["seq_first", "batch_first", "unbatched"].index(layout)
    seed = 2000 + 8 * layout_index + 4 * need_weights + 2 * with_kpm + extras[0]
    gen = torch.Generator().manual_seed(seed)
    ours, ref = make_pair(
        seed, batch_first=layout == "batch_first", add_bias_kv=extras[0], add_zero_attn=extras[1]
    )
    q, k, v = make_inputs(gen, "self", layout)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    kpm = make_key_padding_mask(gen, "bool", L, layout == "unbatched") if with_kpm else None
    if kpm is not None:
        kpm[..., 0] = False  # row 0 keeps its only key
    (out, w), (ref_out, ref_w) = run_both(
        ours, ref, q, k, v, attn_mask=causal, is_causal=True, key_padding_mask=kpm, need_weights=need_weights,
    )
    assert_matches(out, ref_out)
    if need_weights:
        assert_matches(w, ref_w)


def test_is_causal_uses_the_op_flag_only_where_torch_trusts_the_hint(monkeypatch):
    calls = spy_op(monkeypatch)
    layer = mha_ext.nn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    layer(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    assert calls[-1]["is_causal"] is True and calls[-1]["attn_mask"] is None
    layer(x, x, x, attn_mask=causal, is_causal=True, need_weights=True)
    assert calls[-1]["is_causal"] is False and calls[-1]["attn_mask"] is not None


def test_gradients_match_torch():
    gen = torch.Generator().manual_seed(7)
    ours, ref = make_pair(7, batch_first=True, add_bias_kv=True)
    q = torch.randn(N, L, E, generator=gen, requires_grad=True)
    kv = torch.randn(N, S, E, generator=gen, requires_grad=True)
    mask = make_attn_mask(gen, "float3d", S, N)
    mask[..., 1, :] = 0.0  # every row valid, so torch's gradients are finite
    mask.requires_grad_(True)
    kpm = torch.randn(N, S, generator=gen).masked_fill(torch.rand(N, S, generator=gen) < 0.2, float("-inf"))
    q_ref, kv_ref, mask_ref = (t.detach().double().requires_grad_(True) for t in (q, kv, mask))
    grad_out = torch.randn(N, L, E, generator=gen)

    out, _ = ours(q, kv, kv, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    ref_out, _ = ref(q_ref, kv_ref, kv_ref, key_padding_mask=kpm.double(), attn_mask=mask_ref, need_weights=False)
    assert torch.isfinite(ref_out).all()
    (out * grad_out).sum().backward()
    (ref_out * grad_out.double()).sum().backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)
    for name, t, t_ref in (("query", q, q_ref), ("key/value", kv, kv_ref), ("attn_mask", mask, mask_ref)):
        torch.testing.assert_close(t.grad.double(), t_ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_backward_with_the_default_need_weights():
    """need_weights=True (torch's default) in training: the output back-propagates, the weights are extra."""
    ours, ref = make_pair(11)
    x = torch.randn(L, N, E, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    out, weights = ours(x, x, x)
    ref_out, _ = ref(x_ref, x_ref, x_ref)
    out.sum().backward()
    ref_out.sum().backward()
    assert weights.shape == (N, L, L)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"add_bias_kv": True}, {"kdim": KDIM, "vdim": VDIM}, {"kdim": KDIM, "bias": False}],
)
def test_state_dict_loads_both_ways(kwargs):
    torch.manual_seed(0)
    ours = mha_ext.nn.MultiheadAttention(E, H, **kwargs)
    theirs = torch.nn.MultiheadAttention(E, H, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert ours._qkv_same_embed_dim == theirs._qkv_same_embed_dim == ("kdim" not in kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    fresh = mha_ext.nn.MultiheadAttention(E, H, **kwargs)
    theirs.load_state_dict(fresh.state_dict(), strict=True)
    for a, b in zip(fresh.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_defaults_and_factory_kwargs_match_torch():
    ours = mha_ext.nn.MultiheadAttention(E, H, dtype=torch.float64, batch_first=True)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = torch.randn(N, L, E, dtype=torch.float64)
    out, w = ours(x, x, x)  # need_weights and average_attn_weights default to True, as in torch
    assert out.dtype == torch.float64 and w.shape == (N, L, L)


def spy_op(monkeypatch):
    """Record the arguments of every mha_ext.scaled_dot_product_attention call the layer makes."""
    calls = []
    real = mha_ext.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        calls.append(dict(query=query, key=key, value=value, attn_mask=attn_mask, is_causal=is_causal,
                          dropout_p=dropout_p, **kw))
        return real(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **kw)

    monkeypatch.setattr(mha_ext.nn.multihead_attention, "scaled_dot_product_attention", spy)
    return calls


def count_linear(monkeypatch):
    calls = []
    real = F.linear

    def spy(x, w, b=None):
        calls.append(w.shape)
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    return calls


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_uses_one_fused_projection_and_strided_views(monkeypatch, batch_first):
    calls, linear = spy_op(monkeypatch), count_linear(monkeypatch)
    layer = mha_ext.nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    layer(x, x, x, need_weights=False)
    assert linear == [(3 * E, E), (E, E)]  # fused in-projection, then out_proj
    q, k, v = (calls[0][n] for n in ("query", "key", "value"))
    assert q.shape == k.shape == v.shape == (N, H, L, E // H)
    storage = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == storage == v.untyped_storage().data_ptr()
    assert not q.is_contiguous()


def test_cross_attention_projects_key_and_value_together(monkeypatch):
    calls, linear = spy_op(monkeypatch), count_linear(monkeypatch)
    layer = mha_ext.nn.MultiheadAttention(E, H)
    q, kv = torch.randn(L, N, E), torch.randn(S, N, E)
    layer(q, kv, kv, need_weights=False)
    assert linear == [(E, E), (2 * E, E), (E, E)]
    assert calls[0]["key"].untyped_storage().data_ptr() == calls[0]["value"].untyped_storage().data_ptr()


def test_masks_reach_the_op_as_views(monkeypatch):
    calls = spy_op(monkeypatch)
    layer = mha_ext.nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    kpm = torch.randn(N, L)
    mask = torch.randn(N * H, L, L)
    layer(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    op_mask, op_bias = calls[0]["attn_mask"], calls[0]["attn_bias"]
    assert op_mask.shape == (N, H, L, L) and op_mask.data_ptr() == mask.data_ptr()
    assert op_bias.shape == (N, 1, 1, L) and op_bias.data_ptr() == kpm.data_ptr()


def test_weights_come_from_the_fused_kernels_reusing_the_lse(monkeypatch):
    calls, weight_calls = spy_op(monkeypatch), []
    real = mha_ext.attention_weights

    def spy(query, key, **kwargs):
        weight_calls.append(kwargs)
        return real(query, key, **kwargs)

    monkeypatch.setattr(mha_ext.nn.multihead_attention, "attention_weights", spy)
    layer = mha_ext.nn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    _, weights = layer(x, x, x, average_attn_weights=False)
    assert calls[0]["return_lse"] and len(weight_calls) == 1
    lse = weight_calls[0]["lse"]
    assert lse is not None and lse.shape == (N, H, L)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N, H, L))


def test_dropout_in_training_uses_the_op():
    layer = mha_ext.nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(N, L, E)
    layer.eval()
    first, _ = layer(x, x, x, need_weights=False)
    second, _ = layer(x, x, x, need_weights=False)
    assert torch.equal(first, second)  # eval: no dropout
    layer.train()
    torch.manual_seed(5)
    outs = [layer(x, x, x, need_weights=False)[0] for _ in range(2)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], first)
    torch.manual_seed(5)
    assert torch.equal(layer(x, x, x, need_weights=False)[0], outs[0])  # torch.manual_seed reproduces it


def test_half_precision_close_to_torch():
    gen = torch.Generator().manual_seed(3)
    ours, ref = make_pair(3, batch_first=True)
    ours = ours.to(torch.bfloat16)
    x = torch.randn(N, L, E, generator=gen)
    kpm = torch.rand(N, L, generator=gen) < 0.3
    kpm[:, 0] = False
    out, w = ours(x.bfloat16(), x.bfloat16(), x.bfloat16(), key_padding_mask=kpm)
    ref_out, ref_w = ref(x.double(), x.double(), x.double(), key_padding_mask=kpm)
    assert out.dtype == w.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(w.double(), ref_w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, x: m(x[0, 0], x[0, 0], x[0, 0]), ValueError, r"query must be 3-D .* got shape \(30,\)"),
        (lambda m, x: m(torch.randn(L, N, E + 1), x, x), ValueError, r"query must have 30 features \(embed_dim\)"),
        (lambda m, x: m(x, torch.randn(S, N, E), x), ValueError, "key and value must have the same sequence length"),
        (lambda m, x: m(x, x, torch.randn(L, N + 1, E)), ValueError, "value must have query's batch size 3"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool)),
         ValueError, r"key_padding_mask must have shape \(3, 7\)"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.int64)),
         TypeError, "key_padding_mask must be a bool or floating tensor, got dtype torch.int64"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool)),
         ValueError, r"attn_mask must have shape \(7, 7\) \(L, S\) or \(9, 7, 7\)"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int32)),
         TypeError, "attn_mask must be a bool or floating tensor, got dtype torch.int32"),
        (lambda m, x: m(x, x, x, is_causal=True), RuntimeError, "is_causal=True needs attn_mask"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    layer = mha_ext.nn.MultiheadAttention(E, H)
    with pytest.raises(error, match=match):
        call(layer, torch.randn(L, N, E))
