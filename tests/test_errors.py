"""Bad input: a clear exception naming the argument, the expected and the actual value; never a crash."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import mha_ext

sdpa = mha_ext.scaled_dot_product_attention


def qkv(L=5, S=7, E=8, Ev=8, Hq=2, Hkv=2, dtype=torch.float32):
    return torch.randn(2, Hq, L, E, dtype=dtype), torch.randn(2, Hkv, S, E, dtype=dtype), torch.randn(2, Hkv, S, Ev, dtype=dtype)


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda q, k, v: sdpa(q[0, 0, 0], k, v), ValueError, r"query must have at least 2 dims \(\.\.\., L, E\), got shape \(8,\)"),
        (lambda q, k, v: sdpa(q, k[0, 0, 0], v), ValueError, r"key must have at least 2 dims \(\.\.\., S, E\), got shape \(8,\)"),
        (lambda q, k, v: sdpa(q, k, v[..., :3, :]), ValueError, r"value's sequence length .* must equal key's S = 7"),
        (lambda q, k, v: sdpa(q, k[..., :5], v), ValueError, r"key's last dim must equal query's head dim E = 8"),
        (lambda q, k, v: sdpa(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), ValueError,
         r"batch dim -4 must be equal or 1 across query, key and value .* got query \(2, 2, 5, 8\), key \(3, 2, 7, 8\)"),
        (lambda q, k, v: sdpa(q, k, v.repeat(1, 2, 1, 1)), ValueError,
         r"key and value must have the same number of heads \(dim -3\), or one of them 1"),
        (lambda q, k, v: sdpa(q.repeat(1, 3, 1, 1)[:, :3], k, v, enable_gqa=True), ValueError,
         r"query heads \(dim -3\) must equal the key/value heads, be a multiple of them"),
        (lambda q, k, v: sdpa(q.repeat(1, 2, 1, 1), k, v), ValueError, r"enable_gqa=True"),
        (lambda q, k, v: sdpa(q, k.double(), v), TypeError, r"key must have the query's dtype Float, got Double"),
        (lambda q, k, v: sdpa(q.int(), k.int(), v.int()), TypeError, r"query must be float32, float64, bfloat16 or float16, got Int"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64)), TypeError,
         r"attn_mask must be bool \(True = attend\) or floating .* got Long .*mask.bool\(\)"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.float64)), TypeError,
         r"attn_mask must be .* query's dtype Float or float32, got Double"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(5, 6\) is not broadcastable to the attention scores' shape \(2, 2, 5, 7\)"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(1, 2, 2, 5, 7, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(1, 2, 2, 5, 7\) is not broadcastable .* more dims"),
        (lambda q, k, v: sdpa(q, k, v, attn_bias=torch.ones(3, 5, 7)), ValueError, r"attn_bias of shape \(3, 5, 7\) is not broadcastable"),
        (lambda q, k, v: sdpa(q, k, v, attn_bias=torch.ones(5, 7, dtype=torch.bool)), TypeError, r"attn_bias must be floating"),
        (lambda q, k, v: sdpa(q, k, v, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\], got 1.5"),
        (lambda q, k, v: sdpa(q, k, v, dropout_p="0.1"), TypeError, r"dropout_p must be a float in \[0, 1\], got str '0.1'"),
        (lambda q, k, v: sdpa(q, k, v, scale="a"), TypeError, r"scale must be a float or None, got str 'a'"),
        (lambda q, k, v: sdpa(q, k, v, scale=float("nan")), ValueError, r"scale must be finite, got nan"),
        (lambda q, k, v: sdpa(q, k, v, scale=float("-inf")), ValueError, r"scale must be finite, got -inf"),
        (lambda q, k, v: sdpa(q, k, v, is_causal="bottom_right"), ValueError,
         r"is_causal must be a bool, 'upper_left' or 'lower_right', got 'bottom_right'"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=causal_lower_right(5, 8)), ValueError,
         r"attn_mask is a CausalBias for \(L, S\) = \(5, 8\), but query and key have \(L, S\) = \(5, 7\)"),
        (lambda q, k, v: sdpa(q.numpy(), k, v), TypeError, r"query must be a torch.Tensor, got ndarray"),
        (lambda q, k, v: sdpa(q, k, v, attn_mask=[[True]]), TypeError, r"attn_mask must be a torch.Tensor, got list"),
        (lambda q, k, v: sdpa(q, k, v.to("meta")), ValueError, r"value must be on the query's device cpu, got meta"),
        (lambda q, k, v: mha_ext.attention_weights(q, k, scale="x"), TypeError, r"scale must be a float or None"),
        (lambda q, k, v: mha_ext.dropout_mask(q, k, -0.5), ValueError, r"dropout_p must be in \[0, 1\], got -0.5"),
    ],
)
def test_bad_input_is_named_and_caught_as_torch_code_expects(make, error, pattern):
    # Code written against torch catches RuntimeError (torch's SDPA raises it); Python code catches the
    # ValueError / TypeError. Both must work, with the message naming the argument.
    with pytest.raises(error, match=pattern) as caught:
        make(*qkv())
    assert isinstance(caught.value, RuntimeError)
    expected_class = mha_ext.errors.AttentionTypeError if error is TypeError else mha_ext.errors.AttentionValueError
    assert type(caught.value) is expected_class
    with pytest.raises(RuntimeError, match=pattern):
        make(*qkv())


def test_op_error_messages_are_the_same_below_the_python_layer():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key's last dim must equal query's head dim E = 8"):
        torch.ops.mha_ext.attention_forward(q, k[..., :5], v, None, None, "none", 1.0)
    with pytest.raises(ValueError, match=r'causal must be "none", "upper_left" or "lower_right", got "yes"'):
        torch.ops.mha_ext.attention_forward(q, k, v, None, None, "yes", 1.0)
    with pytest.raises(ValueError, match=r"scale must be finite, got nan"):
        torch.ops.mha_ext.attention_forward(q, k, v, None, None, "none", float("nan"))


def test_bad_saved_tensors_for_backward_op_are_named():
    q, k, v = qkv()
    out, lse = torch.ops.mha_ext.attention_forward(q, k, v, None, None, "none", 0.3)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 2, 5\)"):
        torch.ops.mha_ext.attention_backward(out, out, lse[..., :3], None, False, False, q, k, v, None, None, "none", 0.3)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 2, 5, 8\)"):
        torch.ops.mha_ext.attention_backward(out[..., :2], out, lse, None, False, False, q, k, v, None, None, "none", 0.3)
    with pytest.raises(ValueError, match=r"a gradient for attn_bias was requested, but attn_bias is not a floating"):
        torch.ops.mha_ext.attention_backward(out, out, lse, None, False, True, q, k, v, None, None, "none", 0.3)


def test_cuda_query_without_cuda_build_is_refused():
    if mha_ext.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make a CUDA tensor with")
    q = torch.randn(1, 2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        sdpa(q, q, q)


HOSTILE = r"""
import torch, mha_ext
sdpa = mha_ext.scaled_dot_product_attention
q = torch.randn(2, 2, 5, 8); k = torch.randn(2, 2, 7, 8); v = torch.randn(2, 2, 7, 8)
cases = [
    lambda: sdpa(q, k, v, attn_mask=torch.ones(0, 7, dtype=torch.bool)),
    lambda: sdpa(q, k[:, :, :0], v[:, :, :0], attn_mask=torch.ones(5, 7, dtype=torch.bool)[:, :0]),
    lambda: sdpa(q, k, v, attn_bias=torch.empty(2, 3, 5, 7)),
    lambda: sdpa(q, k.as_strided((2, 2, 7, 8), (0, 0, 0, 1)), v),     # every key row aliases one row
    lambda: sdpa(q, k, v.as_strided((2, 2, 7, 8), (1, 1, 1, 0))),     # zero last-dim stride
    lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool).as_strided((5, 7), (0, 0))),
    lambda: sdpa(torch.randn(2, 2, 5, 8)[..., ::2], k[..., ::2], v, scale=float('nan')),
    lambda: sdpa(torch.full((1, 1, 3, 4), float('inf')), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)),
    lambda: sdpa(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), attn_bias=torch.full((3, 3), float('nan'))),
    lambda: sdpa(torch.randn(*([1] * 9), 3, 4), torch.randn(*([1] * 9), 3, 4), torch.randn(*([1] * 9), 3, 4)),
    lambda: sdpa(torch.randn(*([2] * 9), 3, 4), torch.randn(*([2] * 9), 3, 4), torch.randn(*([2] * 9), 3, 4)),
    lambda: torch.ops.mha_ext.attention_backward(q, q, torch.zeros(2, 2, 5), None, True, False, q, k, v, None, None, "none", 1.0),
    lambda: torch.ops.mha_ext.attention_weights(q, k, None, None, torch.zeros(2, 2, 4), "none", 1.0),
]
for i, case in enumerate(cases):
    try:
        case()
        print(i, "ok")
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        print(i, type(e).__name__, str(e).splitlines()[0][:100])
print("survived")
"""


@pytest.mark.slow
def test_hostile_inputs_never_crash_the_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", HOSTILE], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived" in result.stdout, result.stdout
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line[0].isdigit())
    assert lines["1"].startswith("ok")  # S = 0 through an empty mask view is a valid call
    assert lines["9"].startswith("ok")  # size-1 batch dims beyond the grid limit are dropped
    assert lines["10"].startswith("AttentionValueError") and "too many batch dims of size > 1" in lines["10"]
    assert lines["11"].startswith("ValueError") and "not a floating tensor" in lines["11"]  # the op, called directly
    assert lines["12"].startswith("ValueError") and "lse must have shape" in lines["12"]
