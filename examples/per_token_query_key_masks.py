"""Multi-head attention with per-token query and key masks on "time flies like an arrow".

Hidden size 768, 12 heads of 64, as bert-base. The seed loops over 12 ``AttentionHead`` modules
and masks with ``torch.bmm(query_mask.unsqueeze(-1), key_mask.unsqueeze(1))`` (0 = masked); here
one fused projection feeds mha_ext's op and ``mha_ext.masks.query_key_mask`` builds the same
mask. No tokenizer is downloaded: a whitespace vocabulary stands in for bert-base-uncased's.
"""

import math

import torch
from torch import nn

import mha_ext
from mha_ext import masks

HIDDEN_SIZE, NUM_HEADS = 768, 12


class MultiHeadAttention(nn.Module):
    def __init__(self, embed_dim=HIDDEN_SIZE, num_heads=NUM_HEADS):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        # Rows h*64:(h+1)*64 of each projection are the seed's head h.
        self.q, self.k, self.v = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.output_linear = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, query_mask=None, key_mask=None, mask=None):
        """``query_mask`` (N, L) and ``key_mask`` (N, S): 1 = real token, 0 = masked; ``mask`` (N, L, S): 0 = masked."""
        if query_mask is not None and key_mask is not None:
            mask = masks.query_key_mask(query_mask, key_mask)
        elif mask is not None:
            mask = masks.from_attention_mask(mask)  # same convention: 1 = attend, 0 = masked

        def heads(x):
            return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        out = mha_ext.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)), heads(self.v(value)),
                                                   attn_mask=mask)
        return self.output_linear(out.transpose(1, 2).flatten(2))


def seed_reference(mha, x, query_mask, key_mask):
    """The seed's per-head loop and its masked_fill(-inf) softmax, with the same weights."""
    outputs = []
    mask = torch.bmm(query_mask.unsqueeze(-1).float(), key_mask.unsqueeze(1).float())
    for h in range(mha.num_heads):
        rows = slice(h * mha.head_dim, (h + 1) * mha.head_dim)
        q, k, v = (nn.functional.linear(x, lin.weight[rows], lin.bias[rows]) for lin in (mha.q, mha.k, mha.v))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(mha.head_dim)
        scores = scores.masked_fill(mask == 0, -float("inf"))
        outputs.append(torch.bmm(torch.softmax(scores, dim=-1), v))
    return mha.output_linear(torch.cat(outputs, dim=-1))


def main():
    torch.manual_seed(0)
    text = "time flies like an arrow"
    vocab = {word: i for i, word in enumerate(dict.fromkeys(text.split()))}
    input_ids = torch.tensor([[vocab[word] for word in text.split()]])
    token_emb = nn.Embedding(len(vocab), HIDDEN_SIZE)
    inputs_embeds = token_emb(input_ids)
    print("query size:", inputs_embeds.size())

    multihead_attn = MultiHeadAttention()
    query = key = value = inputs_embeds
    with torch.no_grad():
        attn_output = multihead_attn(query, key, value)
        print("output size:", attn_output.size())
        assert attn_output.shape == (1, 5, HIDDEN_SIZE)

        # Per-token masks: the query "an" is masked, and no query may look at the key "like".
        query_mask = torch.tensor([[1, 1, 1, 0, 1]])
        key_mask = torch.tensor([[1, 1, 0, 1, 1]])
        masked = multihead_attn(query, key, value, query_mask=query_mask, key_mask=key_mask)
        expected = seed_reference(multihead_attn, inputs_embeds, query_mask, key_mask)
    kept = query_mask[0].bool()
    torch.testing.assert_close(masked[:, kept], expected[:, kept], atol=2e-5, rtol=2e-5)
    # The seed's softmax over an all -inf row gives NaN; mha_ext's masked query attends nothing (zeros).
    assert torch.isnan(expected[:, ~kept]).all()
    torch.testing.assert_close(masked[:, ~kept], multihead_attn.output_linear.bias.expand(1, 1, -1))
    print("masked output size:", masked.size(), "- matches the seed's per-head loop on kept queries")


if __name__ == "__main__":
    main()
