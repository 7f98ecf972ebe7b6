"""Padding-free Hugging Face models with attn_implementation="mha_ext": packed rows (position_ids restarting per
sequence, DataCollatorWithFlattening's cu_seq_lens_* / max_length_* kwargs) and run_unpadded on padded batches,
against attn_implementation="eager" run on each sequence alone or on the padded batch.

Tiny randomly initialised models built from local configs (no downloads): a BERT encoder and a Llama-style
causal decoder with grouped-query attention (2 key/value heads for 4 query heads).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mha_ext  # noqa: E402,F401
import mha_ext.integrations.transformers as hf  # noqa: E402

# Whole (tiny) models, built and run per test: seconds for the module.
pytestmark = pytest.mark.slow

ATOL = RTOL = 2e-5
VOCAB = 50
LAYERS = 2
LENGTHS = [10, 1, 4, 2]  # very uneven, one of length 1


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=LAYERS, num_attention_heads=3, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def eager_models():
    """Both tiny models, randomly initialised once, eager attention."""
    models = {}
    for name, config, cls in (
        ("bert", bert_config(), transformers.AutoModel),
        ("llama", llama_config(), transformers.AutoModelForCausalLM),
    ):
        torch.manual_seed(0)
        models[name] = cls.from_config(config, attn_implementation="eager").eval()
    return models


def pair(eager_models, name):
    """(eager, mha_ext) copies of the same weights."""
    eager = copy.deepcopy(eager_models[name])
    ours = copy.deepcopy(eager_models[name])
    ours.set_attn_implementation("mha_ext")
    assert ours.config._attn_implementation == "mha_ext"
    return eager, ours


def output_of(name, outputs):
    return outputs.logits if name == "llama" else outputs.last_hidden_state


def spy(monkeypatch):
    """Counts the integration's calls of the varlen and of the dense op (as seen from the integration module)."""
    calls = {"varlen": [], "dense": []}
    varlen, dense = hf.varlen_attention, hf.scaled_dot_product_attention

    def varlen_spy(query, key, value, cu_q, cu_k, *args, **kwargs):
        calls["varlen"].append(dict(query=query.shape, key=key.shape, cu_q=cu_q.tolist(), **kwargs))
        return varlen(query, key, value, cu_q, cu_k, *args, **kwargs)

    def dense_spy(query, key, value, **kwargs):
        calls["dense"].append(dict(query=query.shape, **kwargs))
        return dense(query, key, value, **kwargs)

    monkeypatch.setattr(hf, "varlen_attention", varlen_spy)
    monkeypatch.setattr(hf, "scaled_dot_product_attention", dense_spy)
    return calls


def padded_batch(lengths, total, left_padding=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    positions = torch.arange(total)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    attention_mask = (positions >= total - lengths) if left_padding else (positions < lengths)
    return input_ids.masked_fill(~attention_mask, 0), attention_mask.long()


def sequences(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]


def alone(eager, name, sequence):
    """The eager model's per-token output for one sequence run alone (batch 1, no padding)."""
    with torch.no_grad():
        return output_of(name, eager(sequence[None]))[0]


# ---------------------------------------------------------------------------------------------------------------
# (a) run_unpadded on padded batches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left_padding", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_run_unpadded_matches_padded_eager(eager_models, monkeypatch, name, left_padding):
    eager, ours = pair(eager_models, name)
    input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS), left_padding, seed=1)
    # the padded eager model with each token's position inside its sequence (what run_unpadded packs)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    calls = spy(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask, position_ids=positions)
        out = hf.run_unpadded(ours, input_ids, attention_mask=attention_mask)
    assert len(calls["varlen"]) == LAYERS and not calls["dense"]
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert all(c["cu_q"] == cu for c in calls["varlen"])
    result = output_of(name, out)
    assert result.shape == output_of(name, expected).shape
    valid = attention_mask.bool()
    torch.testing.assert_close(result[valid], output_of(name, expected)[valid], atol=ATOL, rtol=RTOL)
    assert not result[~valid].any()  # zeros at padding
    if name == "llama":
        # grouped-query attention on the varlen kernels: 4 query heads read 2 key/value heads, not repeated
        assert calls["varlen"][0]["query"][1] == 4 and calls["varlen"][0]["key"][1] == 2
        assert calls["varlen"][0]["enable_gqa"] and calls["varlen"][0]["is_causal"] == "lower_right"
    else:
        assert calls["varlen"][0]["is_causal"] is False
        # pooler_output is recomputed from each sequence's first token (the padded model pools row position 0,
        # the same token with right padding)
        assert out.pooler_output.shape == (len(LENGTHS), 24)
        if not left_padding:
            torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=ATOL, rtol=RTOL)


def test_run_unpadded_packs_given_position_ids(eager_models):
    """Left padding with the padded model's default positions 0..L-1 (offset by the padding): passed explicitly,
    run_unpadded packs them as they are."""
    eager, ours = pair(eager_models, "llama")
    input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS), left_padding=True, seed=2)
    positions = torch.arange(max(LENGTHS)).expand(len(LENGTHS), -1)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask).logits
        out = hf.run_unpadded(ours, input_ids, attention_mask=attention_mask, position_ids=positions).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=ATOL, rtol=RTOL)


def test_run_unpadded_hidden_states_and_attentions(eager_models):
    eager, ours = pair(eager_models, "bert")
    input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS), seed=3)
    token_type_ids = torch.randint(0, 2, input_ids.shape, generator=torch.Generator().manual_seed(3))
    options = dict(attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True,
                   output_attentions=True)
    with torch.no_grad():
        expected = eager(input_ids, **options)
        out = hf.run_unpadded(ours, input_ids, **options)
    valid = attention_mask.bool()
    assert len(out.hidden_states) == len(expected.hidden_states) == LAYERS + 1
    for a, b in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a[valid], b[valid], atol=ATOL, rtol=RTOL)
    pairs = valid[:, None, :, None] & valid[:, None, None, :]
    for a, b in zip(out.attentions, expected.attentions):
        assert a.shape == b.shape
        torch.testing.assert_close(a[pairs.expand(a.shape)], b[pairs.expand(b.shape)], atol=ATOL, rtol=RTOL)
        assert not a[~pairs.expand(a.shape)].any()


def test_run_unpadded_requires_mha_ext(eager_models):
    input_ids, attention_mask = padded_batch([3, 2], 3)
    with pytest.raises(ValueError, match="attn_implementation='mha_ext'.*uses 'eager'"):
        hf.run_unpadded(eager_models["llama"], input_ids, attention_mask=attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# (b) direct padding-free calls
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [None, False], ids=["default", "no_cache"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_packed_position_ids_alone_take_varlen(eager_models, monkeypatch, name, use_cache):
    """Packed input_ids + position_ids only. For Llama with use_cache=False transformers also builds the
    block-diagonal causal mask (which mha_ext recognises and drops); with its default cache it builds none."""
    eager, ours = pair(eager_models, name)
    parts = sequences(LENGTHS, seed=4)
    input_ids = torch.cat(parts)[None]
    position_ids = torch.cat([torch.arange(len(p)) for p in parts])[None]
    options = {} if use_cache is None else dict(use_cache=use_cache)
    calls = spy(monkeypatch)
    with torch.no_grad():
        out = output_of(name, ours(input_ids, position_ids=position_ids, **options))[0]
    assert len(calls["varlen"]) == LAYERS and not calls["dense"]
    expected = torch.cat([alone(eager, name, p) for p in parts])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_data_collator_with_flattening(eager_models, monkeypatch, name, flash_kwargs):
    eager, ours = pair(eager_models, name)
    parts = sequences(LENGTHS, seed=5)
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs,
                                                       return_position_ids=True)
    batch = collator([{"input_ids": p.tolist()} for p in parts])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs and batch["input_ids"].shape == (1, sum(LENGTHS))
    labels = batch.pop("labels")
    if name == "llama":
        batch["labels"] = labels
    calls = spy(monkeypatch)
    with torch.no_grad():
        out = ours(**batch)
    assert len(calls["varlen"]) == LAYERS and not calls["dense"]
    expected = torch.cat([alone(eager, name, p) for p in parts])
    torch.testing.assert_close(output_of(name, out)[0], expected, atol=ATOL, rtol=RTOL)
    if name == "llama":
        # the collator's labels (-100 at each sequence start) give the padded model's loss
        input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS))
        for row, p in enumerate(parts):
            input_ids[row, : len(p)] = p
        padded_labels = input_ids.masked_fill(~attention_mask.bool(), -100)
        with torch.no_grad():
            expected_loss = eager(input_ids, attention_mask=attention_mask, labels=padded_labels).loss
        torch.testing.assert_close(out.loss, expected_loss, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# (c) training: gradients
# ---------------------------------------------------------------------------------------------------------------


def assert_same_grads(ours, eager):
    for (name, a), b in zip(ours.named_parameters(), eager.parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("left_padding", [False, True], ids=["right", "left"])
def test_training_bert_run_unpadded_gradients(eager_models, monkeypatch, left_padding):
    eager, ours = pair(eager_models, "bert")
    eager.train(), ours.train()
    input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS), left_padding, seed=6)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    weight = torch.randn(24, generator=torch.Generator().manual_seed(6))
    valid = attention_mask.bool()

    def loss_of(hidden):  # a loss over the tokens only, padding excluded
        return (hidden[valid] * weight).tanh().sum()

    calls = spy(monkeypatch)
    loss_of(eager(input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state).backward()
    loss_of(hf.run_unpadded(ours, input_ids, attention_mask=attention_mask).last_hidden_state).backward()
    assert len(calls["varlen"]) == LAYERS and not calls["dense"]
    assert_same_grads(ours, eager)


@pytest.mark.parametrize("how", ["run_unpadded", "collator"])
def test_training_llama_gradients(eager_models, monkeypatch, how):
    eager, ours = pair(eager_models, "llama")
    eager.train(), ours.train()
    input_ids, attention_mask = padded_batch(LENGTHS, max(LENGTHS), seed=7)
    labels = input_ids.masked_fill(~attention_mask.bool(), -100)
    eager(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    calls = spy(monkeypatch)
    if how == "run_unpadded":
        loss = hf.run_unpadded(ours, input_ids, attention_mask=attention_mask, labels=labels).loss
    else:
        rows = [input_ids[b, : n] for b, n in enumerate(LENGTHS)]
        batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": r.tolist()} for r in rows])
        loss = ours(**batch).loss
    loss.backward()
    assert len(calls["varlen"]) == LAYERS and not calls["dense"]
    assert_same_grads(ours, eager)


# ---------------------------------------------------------------------------------------------------------------
# (d) which path: non-packed calls stay dense; masks together with packing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_non_packed_calls_take_the_dense_path(eager_models, monkeypatch, name):
    eager, ours = pair(eager_models, name)
    calls = spy(monkeypatch)
    single = sequences([6], seed=8)[0][None]  # batch 1, positions 0..5 (Llama passes them): one sequence
    input_ids, attention_mask = padded_batch([6, 3], 6, seed=8)
    with torch.no_grad():
        one = output_of(name, ours(single))
        padded = output_of(name, ours(input_ids, attention_mask=attention_mask))
        expected_one = output_of(name, eager(single))
        expected_padded = output_of(name, eager(input_ids, attention_mask=attention_mask))
    assert not calls["varlen"] and len(calls["dense"]) == 2 * LAYERS
    torch.testing.assert_close(one, expected_one, atol=ATOL, rtol=RTOL)
    valid = attention_mask.bool()
    torch.testing.assert_close(padded[valid], expected_padded[valid], atol=ATOL, rtol=RTOL)


class Module(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


def reference(q, k, v, keep, scale):
    """fp64 attention of (1, H, T, E) tensors with a (T, T) bool mask; rows with no key give 0."""
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (weights @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("is_causal", [False, True])
def test_padding_inside_a_packed_row(monkeypatch, is_causal):
    """cu_seq_lens_* say the sequences are independent; a mask with padding tokens given too says more: both
    hold (the mask intersected with the packing, run dense). With packing only inferred from position_ids, a
    mask other than the packing one wins, as in transformers."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    padding = torch.tensor([True, True, False, True, True, True, False])  # a padding token ends each sequence
    rows = torch.arange(7)
    same = (rows[:, None] >= 3) == (rows[None, :] >= 3)
    causal = rows[None, :] <= rows[:, None] if is_causal else torch.ones(7, 7, dtype=torch.bool)
    mask = (causal & padding[None, :])[None, None]  # what transformers builds from a 2-D padding mask
    calls = spy(monkeypatch)
    out, _ = hf.attention_forward(Module(is_causal), q, k, v, mask, scaling=0.5, cu_seq_lens_q=cu,
                                  cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    assert not calls["varlen"] and calls["dense"][0]["attn_mask"].shape == (1, 1, 7, 7)
    valid = padding  # rows of padding tokens are don't-cares
    expected = reference(q, k, v, causal & padding[None, :] & same, 0.5)
    torch.testing.assert_close(out[0, valid].double(), expected[0, valid], atol=ATOL, rtol=RTOL)

    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    out, _ = hf.attention_forward(Module(is_causal), q, k, v, mask, scaling=0.5, position_ids=positions)
    expected = reference(q, k, v, causal & padding[None, :], 0.5)
    torch.testing.assert_close(out[0, valid].double(), expected[0, valid], atol=ATOL, rtol=RTOL)

    # the exact packing mask with them is dropped: varlen
    calls["varlen"].clear()
    exact = (causal & same)[None, None]
    out, _ = hf.attention_forward(Module(is_causal), q, k, v, exact, scaling=0.5, position_ids=positions)
    assert len(calls["varlen"]) == 1
    torch.testing.assert_close(out[0].double(), reference(q, k, v, causal & same, 0.5)[0], atol=ATOL, rtol=RTOL)


def test_packed_output_attentions_run_dense_block_diagonal(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    calls = spy(monkeypatch)
    out, weights = hf.attention_forward(Module(True), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu,
                                        cu_seq_lens_k=cu, output_attentions=True)
    assert not calls["varlen"] and len(calls["dense"]) == 1
    rows = torch.arange(5)
    keep = ((rows[:, None] >= 2) == (rows[None, :] >= 2)) & (rows[None, :] <= rows[:, None])
    torch.testing.assert_close(out[0].double(), reference(q, k, v, keep, 0.5)[0], atol=ATOL, rtol=RTOL)
    assert weights.shape == (1, 2, 5, 5) and not weights[..., ~keep].any()


def test_offsets_that_do_not_cover_the_call_raise():
    q = torch.randn(1, 2, 5, 4)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="end at 4 / 4 tokens but this attention call has 5"):
        hf.attention_forward(Module(True), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
