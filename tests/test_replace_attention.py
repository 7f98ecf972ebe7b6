"""mha_ext.nn.replace_attention: swapped models keep their weights and outputs and really run mha_ext."""

import copy

import pytest
import torch

import mha_ext
import mha_ext.nn

D_MODEL, NHEAD, FF = 24, 4, 40  # even head count and batch_first: torch's fused paths would be eligible


def count_op_calls(monkeypatch):
    calls = []
    real = mha_ext.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mha_ext.nn.multihead_attention, "scaled_dot_product_attention", spy)
    return calls


def transformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return torch.nn.Transformer(
        D_MODEL, NHEAD, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF,
        dropout=0.0, batch_first=True, **kwargs,
    )


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=3)


def padding(lengths, total):
    """nn.Transformer's key padding convention: True = padding."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def as_double(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def transformer_inputs(gen):
    src = torch.randn(3, 9, D_MODEL, generator=gen)
    tgt = torch.randn(3, 6, D_MODEL, generator=gen)
    return dict(
        src=src,
        tgt=tgt,
        tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(6).isinf(),  # bool, like the padding masks
        tgt_is_causal=True,
        src_key_padding_mask=padding([9, 4, 7], 9),
        tgt_key_padding_mask=padding([6, 5, 2], 6),
        memory_key_padding_mask=padding([9, 4, 7], 9),
    )


def test_transformer_outputs_unchanged_and_run_on_mha_ext(monkeypatch):
    model = transformer().eval()
    reference = copy.deepcopy(model).double().train()  # train mode: torch's unfused reference path
    inputs = transformer_inputs(torch.Generator().manual_seed(1))
    assert mha_ext.nn.replace_attention(model) is model
    calls = count_op_calls(monkeypatch)
    with torch.no_grad():  # eval + no_grad: where torch's fused paths would bypass self_attn.forward
        out = model(**inputs)
        expected = reference(**as_double(inputs))
    assert len(calls) == 2 + 2 * 2  # every encoder self-attention, decoder self- and cross-attention
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_encoder_fast_paths_bypass_an_unswapped_model(monkeypatch):
    """The spy sees torch's fused paths: without the swap (or without its hook) mha_ext is not called."""
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(2, 5, D_MODEL, generator=gen)
    kpm = padding([5, 3], 5)
    calls = count_op_calls(monkeypatch)
    plain = encoder().eval()
    with torch.no_grad():
        plain(src, src_key_padding_mask=kpm)
    assert calls == []

    swapped = mha_ext.nn.replace_attention(encoder().eval())
    with torch.no_grad():
        swapped(src, src_key_padding_mask=kpm)
        swapped(src)
    assert len(calls) == 2 * 3

    for layer in swapped.layers:  # undo the hook: torch's fused encoder layer takes over again
        layer.self_attn._forward_pre_hooks.clear()
    calls.clear()
    with torch.no_grad():
        swapped(src)
    assert calls == []


def test_encoder_outputs_unchanged_with_padding():
    model = encoder(3).eval()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    src = torch.randn(3, 8, D_MODEL, generator=gen)
    kpm = padding([8, 3, 6], 8)
    with torch.no_grad():
        expected = reference(src, src_key_padding_mask=kpm)  # torch's own (nested-tensor) fast path
        out = mha_ext.nn.replace_attention(model)(src, src_key_padding_mask=kpm)
    valid = ~kpm  # torch's nested path writes zeros at padded positions; compare real tokens
    torch.testing.assert_close(out[valid], expected[valid], atol=2e-5, rtol=2e-5)


def test_weights_kept_in_place_and_state_dict_round_trips():
    model = transformer(5)
    params = {name: p for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    mha_ext.nn.replace_attention(model)
    attn = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attn) == 6 and all(type(m) is mha_ext.nn.MultiheadAttention for m in attn)
    assert all(p is params[name] for name, p in model.named_parameters())  # optimizers stay valid
    assert model.state_dict().keys() == state.keys()
    fresh = transformer(6)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(state, strict=True)


def test_training_gradients_match_torch():
    model = transformer(7).train()
    reference = copy.deepcopy(model).double()
    mha_ext.nn.replace_attention(model)
    inputs = transformer_inputs(torch.Generator().manual_seed(8))
    model(**inputs).pow(2).sum().backward()
    reference(**as_double(inputs)).pow(2).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=5e-4, rtol=5e-4, msg=name)


class UserModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.MultiheadAttention(D_MODEL, 3, kdim=10, vdim=10)
        self.blocks = torch.nn.ModuleList([self.shared, torch.nn.Linear(D_MODEL, D_MODEL)])
        self.cross = torch.nn.MultiheadAttention(D_MODEL, 2, add_bias_kv=True, add_zero_attn=True)

    def forward(self, x, memory):
        x = self.shared(x, memory, memory, need_weights=False)[0]
        return self.cross(self.blocks[1](x), x, x)[0]


def test_user_module_shared_layers_and_idempotence(monkeypatch):
    torch.manual_seed(9)
    model = UserModel()
    reference = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(10)
    x, memory = torch.randn(4, 2, D_MODEL, generator=gen), torch.randn(6, 2, 10, generator=gen)
    mha_ext.nn.replace_attention(model)
    mha_ext.nn.replace_attention(model)  # a second call changes nothing
    assert model.shared is model.blocks[0] and type(model.shared) is mha_ext.nn.MultiheadAttention
    assert len(model.shared._forward_pre_hooks) == 1
    calls = count_op_calls(monkeypatch)
    out = model(x, memory)
    assert len(calls) == 2
    torch.testing.assert_close(out.double(), reference(x.double(), memory.double()), atol=2e-5, rtol=2e-5)


def test_model_that_is_itself_an_attention_layer():
    layer = torch.nn.MultiheadAttention(D_MODEL, NHEAD)
    assert mha_ext.nn.replace_attention(layer) is layer
    assert type(layer) is mha_ext.nn.MultiheadAttention


def test_subclasses_are_left_alone_with_a_warning():
    class Custom(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.Sequential(Custom(D_MODEL, NHEAD))
    with pytest.warns(UserWarning, match=r"0 \(Custom\)"):
        mha_ext.nn.replace_attention(model)
    assert type(model[0]) is Custom


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        mha_ext.nn.replace_attention({})
