"""The fp64 reference attention every kernel is compared with, per-dtype tolerances, and the devices the
API tests run on."""

from __future__ import annotations

import math

import pytest
import torch

import mha_ext

# (atol, rtol) of mha_ext's output against the fp64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def at_thread_counts(run):
    """[run() with 1 torch thread, run() with max(2, current) threads]; the thread count is restored."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    return results


def make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype, device, generator):
    """Random query (B, Hq, L, E), key (B, Hkv, S, E) and value (B, Hkv, S, Ev) from `generator`."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    return randn(B, Hq, L, E), randn(B, Hkv, S, E), randn(B, Hkv, S, Ev)


def leaf(t):
    """A copy of `t` that autograd gives a gradient."""
    return t.detach().clone().requires_grad_(True)


def cuda_ready() -> bool:
    return torch.cuda.is_available() and mha_ext.build_info()["cuda"]


# The API tests' devices: the CPU, and a GPU where there is one (marker gpu).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or build")])]


# The reference avoids torch.exp and torch.logsumexp: on this project's Sapphire Rapids CPUs, torch 2.13's
# float64 exp (MKL's vector math, which logsumexp uses too) is off by ~3e-9 relative in about one process in
# four, far outside float64's tolerance; torch.softmax and torch.pow(e, x) are exact there.
def causal_allowed(L, S, is_causal, device=None):
    """The (L, S) bool mask of the pairs causality allows, True = attend: j <= i for True / "upper_left",
    j <= i + S - L for "lower_right"."""
    diagonal = S - L if is_causal == "lower_right" else 0
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal)


def reference_attention(query, key, value, attn_mask=None, attn_bias=None, is_causal=False, scale=None,
                        return_lse=False):
    """Unfused attention in float64, written from the definition: what mha_ext must compute.

    Bool mask True = attend; floating masks and bias are added; is_causal True / "upper_left" /
    "lower_right"; leading dims broadcast as in torch (a key/value head count dividing the query's is
    grouped-query attention); rows with nothing to attend give 0.
    """
    q, k, v = query.double(), key.double(), value.double()

    def repeat_heads(t):  # grouped-query attention; one head broadcasts by itself
        if q.dim() >= 3 and t.dim() >= 3 and 1 < t.size(-3) < q.size(-3):
            return t.repeat_interleave(q.size(-3) // t.size(-3), dim=-3)
        return t

    k, v = repeat_heads(k), repeat_heads(v)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.double()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.double()
    if is_causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(~causal_allowed(L, S, is_causal, scores.device), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if scores.size(-1) else scores.new_full(scores.shape[:-1] + (1,), -math.inf)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # empty rows: lse = log(0) = -inf
    lse = torch.pow(math.e, scores - row_max).sum(dim=-1).log() + row_max.squeeze(-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: softmax NaN -> 0
    out = probs @ v
    return (out, lse) if return_lse else out


def assert_close_to_reference(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol * scale)
