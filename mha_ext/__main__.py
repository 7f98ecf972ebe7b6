"""`python -m mha_ext`: build information plus a self-check of the kernels against torch on sample
inputs (the TensorFlow tutorial's worked example among them). Exits non-zero if a check fails."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import mha_ext
from mha_ext import info


def _seed_004_example() -> tuple[bool, str]:
    # seed 004: four keys, the third and fourth identical; three queries.
    k = torch.tensor([[10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10]], dtype=torch.float32)
    v = torch.tensor([[1, 0], [10, 0], [100, 5], [1000, 6]], dtype=torch.float32)
    q = torch.tensor([[0, 0, 10], [0, 10, 0], [10, 10, 0]], dtype=torch.float32)
    out = mha_ext.scaled_dot_product_attention(q, k, v)
    weights = mha_ext.attention_weights(q, k)
    expected_out = torch.tensor([[550.0, 5.5], [10.0, 0.0], [5.5, 0.0]])
    expected_weights = torch.tensor([[0, 0, 0.5, 0.5], [0, 1, 0, 0], [0.5, 0.5, 0, 0]])
    ok = torch.allclose(out, expected_out, atol=1e-3) and torch.allclose(weights, expected_weights, atol=1e-6)
    return ok, f"output {out.tolist()}"


def _against_torch(dtype: torch.dtype, **kwargs) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=gen).to(dtype) for n in (77, 131, 131))
    ours = mha_ext.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)
    err = (ours.double() - theirs).abs().max().item()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    return err <= tol, f"max |ours - torch| = {err:.2e} (tolerance {tol:g})"


def self_check() -> bool:
    gen = torch.Generator().manual_seed(1)
    padding = torch.rand(2, 1, 1, 131, generator=gen) > 0.5
    padding[..., 0] = True
    bias = torch.randn(4, 77, 131, generator=gen, dtype=torch.float64)
    checks = [
        ("seed 004 worked example", _seed_004_example),
        ("no mask, float32", lambda: _against_torch(torch.float32)),
        ("causal, float32", lambda: _against_torch(torch.float32, is_causal=True)),
        ("bool padding mask (True = attend)", lambda: _against_torch(torch.float32, attn_mask=padding)),
        ("float bias", lambda: _against_torch(torch.float32, attn_mask=bias.float())),
        ("no mask, bfloat16", lambda: _against_torch(torch.bfloat16)),
    ]
    all_ok = True
    for name, check in checks:
        ok, detail = check()
        all_ok &= ok
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
    return all_ok


def main() -> int:
    info.main()
    print("self-check against torch.nn.functional.scaled_dot_product_attention:")
    ok = self_check()
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
