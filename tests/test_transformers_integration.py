"""attn_implementation="mha_ext" in Hugging Face transformers, against attn_implementation="eager".

Tiny randomly initialised models built from local configs (no downloads): a BERT encoder and a
Llama-style decoder with grouped-query attention.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mha_ext  # noqa: E402
import mha_ext.integrations.transformers as hf  # noqa: E402

# Whole (tiny) models, built and run per test: seconds for the module.
pytestmark = pytest.mark.slow

ATOL = RTOL = 2e-5
VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Both tiny models, randomly initialised and saved locally once."""
    paths = {}
    for name, config, cls in (
        ("bert", bert_config(), transformers.AutoModel),
        ("llama", llama_config(), transformers.AutoModelForCausalLM),
    ):
        torch.manual_seed(0)
        model = cls.from_config(config, attn_implementation="eager")
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


def load(saved, name, attn_implementation):
    cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(saved[name], attn_implementation=attn_implementation).eval()


def spy_op(monkeypatch):
    calls = []
    real = mha_ext.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append(dict(query=query.shape, key=key.shape, **kwargs))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)
    return calls


def batch(lengths, total, left_padding=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    positions = torch.arange(total)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    attention_mask = (positions >= total - lengths) if left_padding else (positions < lengths)
    input_ids = input_ids.masked_fill(~attention_mask, 0)
    return input_ids, attention_mask.long()


def test_bert_padded_batch_matches_eager(saved, monkeypatch):
    eager, ours = load(saved, "bert", "eager"), load(saved, "bert", "mha_ext")
    input_ids, attention_mask = batch([9, 4, 6], 9)
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask).last_hidden_state
        out = ours(input_ids, attention_mask=attention_mask).last_hidden_state
    assert len(calls) == 2
    assert calls[0]["attn_mask"].dtype == torch.bool and calls[0]["attn_mask"].shape == (3, 1, 9, 9)
    assert not calls[0]["is_causal"]
    valid = attention_mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=ATOL, rtol=RTOL)


def test_bert_unpadded_batch_runs_without_a_mask(saved, monkeypatch):
    eager, ours = load(saved, "bert", "eager"), load(saved, "bert", "mha_ext")
    input_ids, _ = batch([7, 7], 7, seed=1)
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids).last_hidden_state
        out = ours(input_ids).last_hidden_state
    assert calls and all(c["attn_mask"] is None and not c["is_causal"] for c in calls)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("left_padding", [False, True])
def test_llama_gqa_padded_batch_matches_eager(saved, monkeypatch, left_padding):
    eager, ours = load(saved, "llama", "eager"), load(saved, "llama", "mha_ext")
    input_ids, attention_mask = batch([8, 3, 5], 8, left_padding=left_padding, seed=2)
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask).logits
        out = ours(input_ids, attention_mask=attention_mask).logits
    assert len(calls) == 2
    # grouped-query attention: 4 query heads read 2 key/value heads, which are not repeated
    assert calls[0]["query"][1] == 4 and calls[0]["key"][1] == 2 and calls[0]["enable_gqa"]
    valid = attention_mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=ATOL, rtol=RTOL)


def test_llama_without_padding_uses_the_causal_flag(saved, monkeypatch):
    eager, ours = load(saved, "llama", "eager"), load(saved, "llama", "mha_ext")
    input_ids, _ = batch([6, 6], 6, seed=3)
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids).logits
        out = ours(input_ids).logits
    assert calls and all(c["attn_mask"] is None and c["is_causal"] for c in calls)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_set_attn_implementation_switches_a_loaded_model(saved, monkeypatch):
    model = load(saved, "llama", "eager")
    input_ids, attention_mask = batch([7, 4], 7, seed=4)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("mha_ext")
    assert model.config._attn_implementation == "mha_ext"
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask).logits
    assert len(calls) == 2
    valid = attention_mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=ATOL, rtol=RTOL)


def test_llama_generation_with_kv_cache_matches_eager(saved, monkeypatch):
    eager, ours = load(saved, "llama", "eager"), load(saved, "llama", "mha_ext")
    input_ids, attention_mask = batch([6, 3], 6, left_padding=True, seed=5)
    options = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                   return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    calls = spy_op(monkeypatch)
    with torch.no_grad():
        expected = eager.generate(input_ids, **options)
        out = ours.generate(input_ids, **options)
    assert any(c["query"][2] == 1 for c in calls)  # decoding steps went through mha_ext too
    assert torch.equal(out.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=f"step {step}")


def test_output_attentions_match_eager(saved):
    eager, ours = load(saved, "bert", "eager"), load(saved, "bert", "mha_ext")
    input_ids, attention_mask = batch([5, 3], 5, seed=6)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        out = ours(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    assert len(out) == len(expected) == 2
    valid = attention_mask.bool()[:, None, :, None]
    for a, b in zip(out, expected):
        assert a.shape == b.shape
        rows = valid.expand(a.shape)
        torch.testing.assert_close(a[rows], b[rows], atol=ATOL, rtol=RTOL)


def test_training_gradients_match_eager(saved):
    eager, ours = load(saved, "llama", "eager").train(), load(saved, "llama", "mha_ext").train()
    input_ids, attention_mask = batch([6, 4], 6, seed=7)
    labels = input_ids.masked_fill(~attention_mask.bool(), -100)
    for model in (eager, ours):
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_position_bias_and_mask_are_both_applied():
    """A T5-style position_bias is added to the scores of the keys the bool mask keeps."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, generator=gen)
    keep = torch.rand(2, 1, 5, 5, generator=gen) < 0.7
    keep[..., 0] = True
    out, weights = hf.attention_forward(torch.nn.Module(), q, k, v, keep, scaling=0.5, position_bias=bias)
    assert weights is None
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.5 + bias.double()
    expected = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=ATOL, rtol=RTOL)


def test_unsupported_features_raise():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="does not support 'softcap'"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)
