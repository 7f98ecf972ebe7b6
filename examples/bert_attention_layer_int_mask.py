"""BERT's ``attention_layer`` on mha_ext.

``from_tensor`` and ``to_tensor`` have different widths, the mask is BERT's 1/0 int
``attention_mask`` of shape [batch, from_seq, to_seq] (1 = attend), inputs may come flattened to
2-D, and ``do_return_2d_tensor`` flattens the output. The result is checked against BERT's own
formula (scores + (1 - mask) * -10000, softmax) computed in float64.
"""

import math

import torch
from torch import nn

import mha_ext
from mha_ext import masks


class BertAttentionLayer(nn.Module):
    """Multi-headed attention from ``from_tensor`` to ``to_tensor`` (self-attention when they are the same)."""

    def __init__(self, from_width, to_width, num_attention_heads=1, size_per_head=512, query_act=None,
                 key_act=None, value_act=None, attention_probs_dropout_prob=0.0, initializer_range=0.02):
        super().__init__()
        self.num_attention_heads, self.size_per_head = num_attention_heads, size_per_head
        width = num_attention_heads * size_per_head
        self.query, self.key, self.value = (nn.Linear(w, width) for w in (from_width, to_width, to_width))
        self.query_act, self.key_act, self.value_act = (act or nn.Identity() for act in (query_act, key_act, value_act))
        self.dropout = attention_probs_dropout_prob
        for layer in (self.query, self.key, self.value):  # BERT's truncated normal (cut at 2 std), zero bias
            cut = 2 * initializer_range
            nn.init.trunc_normal_(layer.weight, std=initializer_range, a=-cut, b=cut)
            nn.init.zeros_(layer.bias)

    def forward(self, from_tensor, to_tensor, attention_mask=None, do_return_2d_tensor=False,
                batch_size=None, from_seq_length=None, to_seq_length=None):
        if from_tensor.dim() == 2:  # [batch * seq, width]: BERT needs the sizes to unflatten
            if None in (batch_size, from_seq_length, to_seq_length):
                raise ValueError("2-D inputs need batch_size, from_seq_length and to_seq_length")
            from_tensor = from_tensor.view(batch_size, from_seq_length, -1)
            to_tensor = to_tensor.view(batch_size, to_seq_length, -1)
        batch, from_len = from_tensor.shape[:2]

        def heads(x):  # [batch, seq, heads * size] -> [batch, heads, seq, size], a view
            return x.unflatten(-1, (self.num_attention_heads, self.size_per_head)).transpose(1, 2)

        q = heads(self.query_act(self.query(from_tensor)))
        k = heads(self.key_act(self.key(to_tensor)))
        v = heads(self.value_act(self.value(to_tensor)))
        mask = None if attention_mask is None else masks.from_attention_mask(attention_mask)  # 1 = attend
        context = mha_ext.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        context = context.transpose(1, 2).reshape(batch, from_len, -1)
        return context.reshape(batch * from_len, -1) if do_return_2d_tensor else context


def bert_reference(layer, from_tensor, to_tensor, attention_mask):
    """BERT's original computation, in float64."""
    def heads(x):
        return x.unflatten(-1, (layer.num_attention_heads, layer.size_per_head)).transpose(1, 2)

    def project(linear, x):
        return heads(nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double()))

    q, k, v = project(layer.query, from_tensor), project(layer.key, to_tensor), project(layer.value, to_tensor)
    scores = q @ k.transpose(-2, -1) / math.sqrt(layer.size_per_head)
    scores = scores + (1.0 - attention_mask[:, None].double()) * -10000.0
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def main():
    torch.manual_seed(0)
    batch, from_len, to_len, from_width, to_width = 2, 4, 6, 16, 24
    # initializer_range 0.2 rather than BERT's 0.02, so the attention is far from uniform and the check bites
    layer = BertAttentionLayer(from_width, to_width, num_attention_heads=4, size_per_head=8,
                               initializer_range=0.2).eval()
    from_tensor = torch.randn(batch, from_len, from_width)
    to_tensor = torch.randn(batch, to_len, to_width)
    attention_mask = torch.ones(batch, from_len, to_len, dtype=torch.int32)
    attention_mask[1, :, 4:] = 0  # the second sequence has 2 padding tokens
    attention_mask[0, 0, 1:] = 0  # first query of the first sequence sees only the first token

    context = layer(from_tensor, to_tensor, attention_mask)
    print("context:", tuple(context.shape))
    expected = bert_reference(layer, from_tensor, to_tensor, attention_mask)
    torch.testing.assert_close(context.double(), expected, atol=2e-5, rtol=2e-5)

    flat = layer(from_tensor.flatten(0, 1), to_tensor.flatten(0, 1), attention_mask, do_return_2d_tensor=True,
                 batch_size=batch, from_seq_length=from_len, to_seq_length=to_len)
    print("2-D in, do_return_2d_tensor:", tuple(flat.shape))
    torch.testing.assert_close(flat, context.flatten(0, 1))
    print("matches BERT's formula")


if __name__ == "__main__":
    main()
