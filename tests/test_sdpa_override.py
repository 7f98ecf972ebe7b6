"""mha_ext.install() / uninstall() / sdpa_override(): torch.nn.functional.scaled_dot_product_attention routed to
mha_ext, with torch's semantics, a fallback to torch (warned once per reason) for calls mha_ext does not take,
on models from real libraries (timm, transformers, torch.nn.MultiheadAttention) and under torch.compile."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import mha_ext
from helpers.reference import TOLERANCES, assert_close_to_reference, make_qkv, reference_attention

override = mha_ext.sdpa_routing
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # what torch.nn.functional's attribute is without the override


@pytest.fixture(autouse=True)
def restored(monkeypatch):
    """Each test starts and ends with torch's own function in place and no fallback reason warned yet."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    monkeypatch.setattr(override, "_warned", set())
    yield
    mha_ext.uninstall()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.fixture
def calls(monkeypatch):
    """The calls the routed function sent to mha_ext.scaled_dot_product_attention (each still runs it)."""
    recorded = []
    real = override._mha_ext_attention

    def spy(*args):
        recorded.append(args)
        return real(*args)

    monkeypatch.setattr(override, "_mha_ext_attention", spy)
    return recorded


def fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, override.SDPAFallbackWarning)]


def qkv(B=2, Hq=4, Hkv=4, L=7, S=9, E=16, Ev=16, dtype=torch.float32, seed=0):
    return make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype, "cpu", torch.Generator().manual_seed(seed))


# --- the switch ---------------------------------------------------------------------------------------------------

def test_install_and_uninstall_are_idempotent_and_restore_the_original_object():
    original = F.scaled_dot_product_attention
    assert not override.is_installed()
    mha_ext.install()
    assert override.is_installed()
    assert F.scaled_dot_product_attention is override.scaled_dot_product_attention
    assert torch.nn.functional.scaled_dot_product_attention is override.scaled_dot_product_attention
    assert torch._C._nn.scaled_dot_product_attention is original  # the C function is left alone
    mha_ext.install()
    assert F.scaled_dot_product_attention is override.scaled_dot_product_attention
    mha_ext.uninstall()
    assert F.scaled_dot_product_attention is original
    mha_ext.uninstall()
    assert F.scaled_dot_product_attention is original and not override.is_installed()


def test_package_exports():
    assert mha_ext.install is override.install
    assert mha_ext.uninstall is override.uninstall
    assert mha_ext.sdpa_override is override.sdpa_override
    assert {"install", "uninstall", "sdpa_override"} <= set(mha_ext.__all__)


def test_context_manager_nests_and_restores_the_previous_state():
    with mha_ext.sdpa_override():
        assert override.is_installed()
        with mha_ext.sdpa_override():
            assert override.is_installed()
        assert override.is_installed()  # the inner block found it installed: left installed
        with mha_ext.sdpa_override(enabled=False):
            assert F.scaled_dot_product_attention is TORCH_SDPA
            with mha_ext.sdpa_override():
                assert override.is_installed()
            assert F.scaled_dot_product_attention is TORCH_SDPA
        assert override.is_installed()
    assert F.scaled_dot_product_attention is TORCH_SDPA

    mha_ext.install()
    with mha_ext.sdpa_override():
        pass
    assert override.is_installed()  # installed globally before the block: still installed after it
    with mha_ext.sdpa_override(enabled=False):
        assert not override.is_installed()
    assert override.is_installed()


def test_context_manager_restores_on_exception():
    with pytest.raises(KeyError):
        with mha_ext.sdpa_override():
            with mha_ext.sdpa_override():
                raise KeyError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA

    mha_ext.install()
    with pytest.raises(KeyError):
        with mha_ext.sdpa_override(enabled=False):
            raise KeyError("boom")
    assert override.is_installed()


def test_decorator_form():
    @mha_ext.sdpa_override()
    def inside():
        return override.is_installed()

    assert inside() and not override.is_installed()


def test_uninstall_leaves_a_later_replacement_in_place():
    def someone_elses(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    mha_ext.install()
    F.scaled_dot_product_attention = someone_elses
    try:
        mha_ext.uninstall()
        assert F.scaled_dot_product_attention is someone_elses
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


def test_signature_is_torchs():
    q, k, v = qkv()
    with mha_ext.sdpa_override():
        # scale and enable_gqa are keyword-only in torch's function too
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)
        out = F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.5, enable_gqa=False)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, scale=0.5), atol=2e-5, rtol=2e-5)


# --- routed calls: torch's semantics, computed by mha_ext ---------------------------------------------------------

def _bool_mask(shape, seed):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., 0] = True  # every row attends something: torch and mha_ext agree exactly there
    return mask


ROUTED_CASES = {
    "plain": lambda q, k: {},
    "bool_mask_broadcast": lambda q, k: dict(attn_mask=_bool_mask((q.size(0), 1, q.size(-2), k.size(-2)), 1)),
    "bool_mask_2d": lambda q, k: dict(attn_mask=_bool_mask((q.size(-2), k.size(-2)), 2)),
    "float_mask": lambda q, k: dict(attn_mask=torch.randn(q.size(-3), q.size(-2), k.size(-2), dtype=q.dtype)),
    "float32_mask": lambda q, k: dict(attn_mask=torch.randn(q.size(-2), k.size(-2), dtype=torch.float32)),
    "causal": lambda q, k: dict(is_causal=True),
    "scale": lambda q, k: dict(scale=0.3),
    "dropout_zero": lambda q, k: dict(dropout_p=0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(ROUTED_CASES))
def test_routed_call_matches_the_reference_and_runs_in_mha_ext(calls, case, dtype):
    q, k, v = qkv(dtype=dtype)
    kwargs = ROUTED_CASES[case](q, k)
    with mha_ext.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert len(calls) == 1
    assert out.dtype == dtype and out.shape == (2, 4, 7, 16)
    ref_kwargs = {key: value for key, value in kwargs.items() if key != "dropout_p"}
    assert_close_to_reference(out, reference_attention(q, k, v, **ref_kwargs), dtype)
    # and what torch's own function gives. torch 2.13's default CPU kernel misreads a float32 mask added to float64
    # inputs (off by about 3 against the reference, where its math backend is right): compared with that one there.
    torch_bug = case == "float32_mask" and dtype == torch.float64
    with sdpa_kernel(SDPBackend.MATH) if torch_bug else contextlib.nullcontext():
        expected = TORCH_SDPA(q, k, v, **kwargs)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, atol=2 * atol, rtol=2 * rtol)


def test_grouped_query_attention(calls):
    q, k, v = qkv(Hq=6, Hkv=2)
    with mha_ext.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert len(calls) == 1
    assert_close_to_reference(out, reference_attention(q, k, v, is_causal=True), torch.float32)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True), atol=4e-5, rtol=4e-5)


def test_gradients_match_torch(calls):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.randn(7, 9, requires_grad=True)
    with mha_ext.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, mask))
    expected = torch.autograd.grad(TORCH_SDPA(q, k, v, attn_mask=mask).square().sum(), (q, k, v, mask))
    assert len(calls) == 1
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fully_masked_row_gives_zero(calls):
    q, k, v = qkv()
    mask = _bool_mask((7, 9), 3)
    mask[2] = False
    with mha_ext.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(calls) == 1
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask), torch.float32)


@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
def test_causal_bias_mask(calls, bias):
    q, k, v = qkv(L=5, S=9)
    with mha_ext.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias(5, 9))
    assert len(calls) == 1
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=bias(5, 9)), atol=4e-5, rtol=4e-5)


@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
def test_causal_bias_mask_falls_back_as_torch_dispatches_it(calls, bias):
    # CausalBias's __torch_function__ handles only torch.nn.functional's attribute: the fallback dispatches it itself
    q = torch.empty(2, 4, 5, 16, device="meta")
    results, warned = _call_twice(q, q[:, :, :1].expand(2, 4, 9, 16), q[:, :, :1].expand(2, 4, 9, 16),
                                  attn_mask=bias(5, 9))
    assert all(r.shape == q.shape for r in results)
    assert len(warned) == 1 and "meta device" in warned[0] and not calls


def test_autocast_runs_in_the_autocast_dtype_as_torch(calls):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TORCH_SDPA(q, k, v, attn_mask=torch.zeros(7, 9))
        with mha_ext.sdpa_override():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(7, 9))
    assert len(calls) == 1 and calls[0][0].dtype == torch.bfloat16 and calls[0][3].dtype == torch.bfloat16
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_jagged_nested_tensors_are_routed(monkeypatch):
    # Whether mha_ext computes them is mha_ext.scaled_dot_product_attention's business: here, that they reach it.
    routed = []
    monkeypatch.setattr(override, "_mha_ext_attention", lambda *args: routed.append(args) or args[0])
    nt = torch.nested.nested_tensor([torch.randn(3, 2, 8), torch.randn(5, 2, 8)], layout=torch.jagged).transpose(1, 2)
    assert override.fallback_reason(nt, nt, nt) is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mha_ext.sdpa_override():
            assert F.scaled_dot_product_attention(nt, nt, nt) is nt
    assert len(routed) == 1 and not fallback_warnings(record)


# --- fallbacks: torch runs them, saying so once per reason -------------------------------------------------------

def _call_twice(*args, **kwargs):
    """Two calls through the override; their results (or errors) and the fallback warnings they raised."""
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mha_ext.sdpa_override():
            for _ in range(2):
                try:
                    results.append(F.scaled_dot_product_attention(*args, **kwargs))
                except RuntimeError as error:
                    results.append(error)
    return results, fallback_warnings(record)


def _torch_error(*args, **kwargs):
    with pytest.raises(RuntimeError) as error:
        TORCH_SDPA(*args, **kwargs)
    return str(error.value)


def test_integer_inputs_fall_back_to_torchs_error(calls):
    q = torch.ones(1, 2, 3, 4, dtype=torch.int32)
    results, warned = _call_twice(q, q, q)
    assert [str(r) for r in results] == [_torch_error(q, q, q)] * 2
    assert len(warned) == 1 and "query has dtype torch.int32" in warned[0] and "torch's scaled_dot_product_attention" in warned[0]
    assert not calls


def test_mask_dtype_torch_refuses_falls_back_to_torchs_error(calls):
    q, k, v = qkv()
    mask = torch.zeros(7, 9, dtype=torch.float64)
    results, warned = _call_twice(q, k, v, attn_mask=mask)
    assert [str(r) for r in results] == [_torch_error(q, k, v, attn_mask=mask)] * 2
    assert len(warned) == 1 and "attn_mask has dtype torch.float64" in warned[0]
    assert not calls


def test_mixed_dtypes_fall_back(calls):
    q, k, v = qkv()
    results, warned = _call_twice(q, k.double(), v)
    assert [str(r) for r in results] == [_torch_error(q, k.double(), v)] * 2
    assert len(warned) == 1 and "key or value" in warned[0] and not calls


def test_strided_nested_tensors_fall_back(calls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype warning for the strided layout
        nt = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
    results, warned = _call_twice(nt, nt, nt)
    expected = TORCH_SDPA(nt, nt, nt)
    for result in results:
        for got, want in zip(result.unbind(), expected.unbind()):
            torch.testing.assert_close(got, want)
    assert len(warned) == 1 and "layout torch.strided" in warned[0] and not calls


def test_meta_device_falls_back(calls):
    q = torch.empty(2, 4, 8, 16, device="meta")
    results, warned = _call_twice(q, q, q)
    assert all(r.device.type == "meta" and r.shape == q.shape for r in results)
    assert len(warned) == 1 and "meta device" in warned[0] and not calls


def test_tensor_subclass_falls_back_to_torchs_dispatch(calls):
    class Tagged(torch.Tensor):
        pass

    q, k, v = qkv()
    results, warned = _call_twice(q.as_subclass(Tagged), k, v)
    assert all(type(r) is Tagged for r in results)  # torch's __torch_function__ handling ran
    torch.testing.assert_close(results[0].as_subclass(torch.Tensor), TORCH_SDPA(q, k, v))
    assert len(warned) == 1 and "Tagged" in warned[0] and not calls


def test_parameters_are_routed(calls):
    q, k, v = (torch.nn.Parameter(t) for t in qkv())
    with mha_ext.sdpa_override():
        F.scaled_dot_product_attention(q, k, v)
    assert len(calls) == 1


def test_vmap_falls_back(calls):
    q, k, v = qkv()
    results, warned = _call_twice(q, k, v)  # routed: no warning
    assert len(calls) == 2 and not warned
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mha_ext.sdpa_override():
            out = torch.vmap(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v))
    assert len(calls) == 2
    assert len(fallback_warnings(record)) == 1 and "torch.func transform" in fallback_warnings(record)[0]


def test_cuda_reasons():
    # Fake CUDA tensors carry the device, dtype and shape the decision reads, with no GPU.
    with FakeTensorMode():
        q = torch.empty(2, 2, 4, 64, device="cuda")
        wide = torch.empty(2, 2, 4, 320, device="cuda")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(override, "_cuda_kernels", False)
            assert "no CUDA kernels" in override.fallback_reason(q, q, q)
            patch.setattr(override, "_cuda_kernels", True)
            assert override.fallback_reason(q, q, q) is None
            assert "above 256" in override.fallback_reason(wide, wide, wide)
            assert "above 256" in override.fallback_reason(q, q, wide)


def test_each_distinct_reason_is_warned_once():
    i = torch.ones(1, 2, 3, 4, dtype=torch.int32)
    m = torch.empty(1, 2, 3, 4, device="meta")
    reasons = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mha_ext.sdpa_override():
            for args in ((i, i, i), (m, m, m), (i, i, i), (m, m, m)):
                try:
                    F.scaled_dot_product_attention(*args)
                except RuntimeError:
                    pass
        reasons = fallback_warnings(record)
    assert len(reasons) == 2 and "int32" in reasons[0] and "meta" in reasons[1]
    # pointed at the caller's line, not at mha_ext's
    assert {w.filename for w in record if issubclass(w.category, override.SDPAFallbackWarning)} == {__file__}


def test_non_tensor_arguments_fall_back():
    assert "not a torch.Tensor" in override.fallback_reason([1.0], [1.0], [1.0])
    q, k, v = qkv()
    assert "attn_mask is a list" in override.fallback_reason(q, k, v, attn_mask=[[True]])
    assert override.fallback_reason(q, k, v, scale=float("inf")) == "scale is not finite"


# --- models from real libraries ----------------------------------------------------------------------------------

def _hits(calls):
    return len(calls)


@pytest.mark.slow
def test_multihead_attention_non_fast_path_is_routed(calls):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()  # dropout 0: the outputs compare
    x = torch.randn(3, 10, 32, requires_grad=True)
    key_padding = torch.arange(10) >= torch.tensor([[10], [6], [3]])  # True = ignore, as torch's layer
    causal = ~torch.ones(10, 10, dtype=torch.bool).tril()  # True = ignore, as torch's layer

    def run():
        out, weights = mha(x, x, x, key_padding_mask=key_padding, attn_mask=causal, need_weights=False)
        assert weights is None
        grads = torch.autograd.grad(out.square().sum(), [x, *mha.parameters()])
        return out, grads

    expected_out, expected_grads = run()
    with mha_ext.sdpa_override():
        out, grads = run()
    assert _hits(calls) == 1  # multi_head_attention_forward looks the function up in its module at call time
    # row 0 of the third sequence attends only key 0; no query row is fully masked: the outputs compare everywhere
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # need_weights=True computes the weights without SDPA, and the fast path (eval, no grad) runs a fused kernel
    with mha_ext.sdpa_override():
        mha(x, x, x, key_padding_mask=key_padding)
        with torch.inference_mode():
            x = x.detach()
            mha.eval()(x, x, x, need_weights=False)  # self-attention: the fast path's condition
    assert _hits(calls) == 1


def _import_timm():
    try:
        import timm
    except Exception as error:  # noqa: BLE001  (a torchvision that does not match torch fails with RuntimeError)
        pytest.skip(f"timm is not importable here: {type(error).__name__}: {error}")
    return timm


def _compare_model(model, inputs, calls, expected_hits, output=lambda out: out, atol=2e-5, rtol=2e-5):
    """model(*inputs) with and without the override, in eval mode and in train mode with a backward: the same
    outputs and gradients, and `expected_hits` routed calls per forward."""
    for train in (False, True):
        model.train(train)

        def run():
            out = output(model(*inputs))
            grads = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True) if train else ()
            return out, grads

        expected_out, expected_grads = run()
        calls.clear()
        with mha_ext.sdpa_override():
            out, grads = run()
        assert len(calls) == expected_hits, f"train={train}"
        torch.testing.assert_close(out, expected_out, atol=atol, rtol=rtol)
        for got, want in zip(grads, expected_grads):
            if want is not None:
                torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol)


@pytest.mark.slow
def test_timm_vit(calls):
    timm = _import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    assert model.blocks[0].attn.fused_attn  # timm calls F.scaled_dot_product_attention
    images = torch.randn(2, 3, 32, 32)
    _compare_model(model, (images,), calls, expected_hits=2)


def _transformers():
    return pytest.importorskip("transformers")


@pytest.mark.slow
def test_transformers_vit_sdpa(calls):
    transformers = _transformers()
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ViTModel._from_config(config, attn_implementation="sdpa")
    images = torch.randn(2, 3, 32, 32)
    _compare_model(model, (images,), calls, expected_hits=2, output=lambda out: out.last_hidden_state)


@pytest.mark.slow
def test_transformers_bert_sdpa_with_padding(calls):
    transformers = _transformers()
    config = transformers.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 50, (3, 12), generator=gen)
    attention_mask = (torch.arange(12) < torch.tensor([[12], [7], [3]])).long()
    _compare_model(model, (input_ids, attention_mask), calls, expected_hits=2,
                   output=lambda out: out.last_hidden_state)
    masks = [call[3] for call in calls]
    assert all(mask is not None for mask in masks)  # the padding reached mha_ext as attn_mask


# --- torch.compile -----------------------------------------------------------------------------------------------

class GraphTargets:
    """A torch.compile backend that records the call targets of the graphs it is given and runs them as they are."""

    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [node.target for node in gm.graph.nodes if node.op == "call_function"]
        return gm.forward

    def count(self, op):
        return sum(target in (op, getattr(op, "default", None)) for target in self.targets)


@pytest.mark.slow
def test_compile_fullgraph_routes_to_the_op():
    torch._dynamo.reset()
    q, k, v = qkv(Hq=6, Hkv=2)
    mask = _bool_mask((2, 1, 7, 9), 4)

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) * 2

    backend = GraphTargets()
    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    mha_ext.install()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = compiled(q, k, v, mask)
    assert backend.count(torch.ops.mha_ext.attention_forward) == 1
    assert backend.count(TORCH_SDPA) == 0 and not fallback_warnings(record)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True) * 2, atol=4e-5, rtol=4e-5)

    # torch.compile guards on the function: uninstalled, the same compiled function is traced again with torch's
    mha_ext.uninstall()
    backend.targets.clear()
    compiled(q, k, v, mask)
    assert backend.count(TORCH_SDPA) == 1 and backend.count(torch.ops.mha_ext.attention_forward) == 0


@pytest.mark.slow
def test_compile_fullgraph_backward_aot_eager():
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in qkv())

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with mha_ext.sdpa_override():
        out = attend(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(TORCH_SDPA(q, k, v, is_causal=True).square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compile_fullgraph_fallback_warns_once_without_graph_break():
    torch._dynamo.reset()
    q = torch.empty(2, 4, 8, 16, device="meta")
    backend = GraphTargets()
    compiled = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), fullgraph=True, backend=backend)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mha_ext.sdpa_override():
            for _ in range(2):
                assert compiled(q).shape == q.shape
    warned = fallback_warnings(record)
    assert len(warned) == 1 and "meta device" in warned[0]
    assert backend.count(TORCH_SDPA) == 1 and backend.count(torch.ops.mha_ext.attention_forward) == 0


def _compile_model(model, inputs, output, expected_ops):
    torch._dynamo.reset()
    model.eval()
    backend = GraphTargets()
    expected = output(model(*inputs))
    with mha_ext.sdpa_override():
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = output(compiled(*inputs))
    assert backend.count(torch.ops.mha_ext.attention_forward) == expected_ops
    assert backend.count(TORCH_SDPA) == 0
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_compile_fullgraph_timm_vit():
    timm = _import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    _compile_model(model, (torch.randn(2, 3, 32, 32),), lambda out: out, expected_ops=2)


@pytest.mark.slow
def test_compile_fullgraph_transformers_vit():
    transformers = _transformers()
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.ViTModel._from_config(config, attn_implementation="sdpa")
    _compile_model(model, (torch.randn(2, 3, 32, 32),), lambda out: out.last_hidden_state, expected_ops=2)
