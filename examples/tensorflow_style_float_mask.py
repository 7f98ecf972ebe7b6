"""The TensorFlow tutorial's ``scaled_dot_product_attention(q, k, v, mask)`` on mha_ext.

Arbitrary leading dims, ``depth_v`` may differ from ``depth``, the mask has 1 = masked (TensorFlow
adds ``mask * -1e9``), and the function returns ``(output, attention_weights)``. The weights come
from mha_ext's fused kernels, recomputed from the log-sum-exp of the same pass. Reproduces the
tutorial's worked example.
"""

import torch

import mha_ext
from mha_ext import masks


def scaled_dot_product_attention(q, k, v, mask):
    """q (..., seq_len_q, depth), k (..., seq_len_k, depth), v (..., seq_len_k, depth_v);
    mask broadcastable to (..., seq_len_q, seq_len_k), 1 = masked, or None.
    Returns output (..., seq_len_q, depth_v) and attention_weights (..., seq_len_q, seq_len_k)."""
    attn_mask = None if mask is None else masks.from_tf_mask(mask)
    output, lse = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, return_lse=True)
    attention_weights = mha_ext.attention_weights(q, k, attn_mask=attn_mask, lse=lse)
    return output, attention_weights


def create_padding_mask(seq):
    """The tutorial's padding mask: 1 where the token id is 0, shaped (batch, 1, 1, seq_len)."""
    return (seq == 0).float()[:, None, None, :]


def create_look_ahead_mask(size):
    """The tutorial's look-ahead mask: 1 above the diagonal (future positions)."""
    return 1.0 - torch.ones(size, size).tril()


def main():
    torch.set_printoptions(precision=4, sci_mode=False)
    temp_k = torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10]])  # (4, 3)
    temp_v = torch.tensor([[1.0, 0], [10, 0], [100, 5], [1000, 6]])  # (4, 2)
    # The tutorial's queries and the outputs it prints.
    cases = [
        ([[0.0, 10, 0]], [[0.0, 1, 0, 0]], [[10.0, 0]]),  # aligns with the second key
        ([[0.0, 0, 10]], [[0.0, 0, 0.5, 0.5]], [[550.0, 5.5]]),  # a repeated key: values averaged
        ([[10.0, 10, 0]], [[0.5, 0.5, 0, 0]], [[5.5, 0]]),  # equally close to two keys
    ]
    for query, weights, output in cases:
        out, attn = scaled_dot_product_attention(torch.tensor(query), temp_k, temp_v, None)
        print("Attention weights are:", attn, "\nOutput is:", out)
        torch.testing.assert_close(attn, torch.tensor(weights), atol=1e-4, rtol=0)
        torch.testing.assert_close(out, torch.tensor(output), atol=1e-3, rtol=0)
    all_queries = torch.tensor([q for q, _, _ in cases]).squeeze(1)  # the three queries together, (3, 3)
    out, attn = scaled_dot_product_attention(all_queries, temp_k, temp_v, None)
    torch.testing.assert_close(out, torch.tensor([o for _, _, o in cases]).squeeze(1), atol=1e-3, rtol=0)

    # Masks: padding (token id 0) combined with look-ahead, 4-D inputs, depth_v != depth.
    torch.manual_seed(0)
    seq = torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0]])
    mask = torch.maximum(create_padding_mask(seq), create_look_ahead_mask(5))
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)
    out, attn = scaled_dot_product_attention(q, k, v, mask)
    logits = q.double() @ k.double().transpose(-2, -1) / 8 ** 0.5 + mask.double() * -1e9  # TensorFlow's formula
    expected_attn = logits.softmax(-1)
    torch.testing.assert_close(attn.double(), expected_attn, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), expected_attn @ v.double(), atol=2e-5, rtol=2e-5)
    print("output", tuple(out.shape), "attention_weights", tuple(attn.shape), "- match TensorFlow's formula")


if __name__ == "__main__":
    main()
