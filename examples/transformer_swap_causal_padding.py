"""``nn.Transformer`` (encoder-decoder) with causal and padding masks, swapped to mha_ext.

``mha_ext.nn.replace_attention`` converts every ``nn.MultiheadAttention`` inside the model in place,
keeping its weights; masks keep nn.Transformer's conventions (``True`` = ignore / not allowed).
The swapped model gives the original's outputs, runs every attention through mha_ext (counted
below, in eval mode where torch would otherwise take its fused encoder path) and trains.
"""

import copy
import warnings

import torch
from torch import nn

import mha_ext
import mha_ext.nn


def main():
    torch.manual_seed(0)
    d_model, nhead, batch, src_len, tgt_len = 32, 4, 2, 7, 5
    model = nn.Transformer(d_model, nhead, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                           dropout=0.0, batch_first=True)
    original = copy.deepcopy(model).eval()
    mha_ext.nn.replace_attention(model)
    swapped = sum(isinstance(m, mha_ext.nn.MultiheadAttention) for m in model.modules())
    print("attention layers now on mha_ext:", swapped)

    src, tgt = torch.randn(batch, src_len, d_model), torch.randn(batch, tgt_len, d_model)
    target = torch.randn(batch, tgt_len, d_model)
    src_padding = torch.arange(src_len) >= torch.tensor([[7], [4]])  # True = padding
    tgt_padding = torch.arange(tgt_len) >= torch.tensor([[5], [3]])
    masks = dict(
        tgt_mask=torch.ones(tgt_len, tgt_len, dtype=torch.bool).triu(1),  # True = may not attend (future)
        tgt_is_causal=True,
        src_key_padding_mask=src_padding,
        tgt_key_padding_mask=tgt_padding,
        memory_key_padding_mask=src_padding,
    )

    # The profiler counts the fused op's calls: one per attention layer, also in eval mode, where torch's
    # own layers would take their fused inference paths.
    model.eval()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = model(src, tgt, **masks)
    calls = sum(event.count for event in profile.key_averages() if event.key == "mha_ext::attention_forward")
    with torch.no_grad(), warnings.catch_warnings():  # torch's fused path warns its nested tensors are a prototype
        warnings.simplefilter("ignore")
        expected = original(src, tgt, **masks)
    print("output:", tuple(out.shape), "mha_ext calls:", calls)
    assert calls == swapped
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the swap kept the parameter objects
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(src, tgt, **masks)[~tgt_padding], target[~tgt_padding])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("training losses:", [round(x, 4) for x in losses])
    assert losses[-1] < losses[0]


if __name__ == "__main__":
    main()
