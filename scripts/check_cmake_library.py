"""Loads the CMake-built op library with torch.ops.load_library (no mha_ext Python package involved) and
checks its forward against torch's attention. Usage: python scripts/check_cmake_library.py build-cmake/libmha_ext_ops.so"""

import sys

import torch
import torch.nn.functional as F

torch.ops.load_library(sys.argv[1])
q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for n in (9, 13, 13))
keep = torch.rand(2, 1, 9, 13) > 0.3
keep[..., 0] = True
out, lse = torch.ops.mha_ext.attention_forward(q, k, v, keep, None, "none", 0.25)
expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)
torch.testing.assert_close(out, expected)
print(f"CMake library {sys.argv[1]}: attention_forward matches torch (max err {(out - expected).abs().max():.1e})")
