"""What only a GPU can show of the CUDA kernels (marker gpu; skipped without one): grid-stride loops past a
grid dimension, streams, torch.compile on CUDA, device errors, and a compute-sanitizer memcheck. The kernels'
results on the GPU are tested in test_cuda_kernels.py, with the emulator's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import mha_ext
from helpers.backends import GPU_MARKS
from helpers.cases import CASES, assert_results_close, make_inputs, run

pytestmark = GPU_MARKS


def test_more_batch_heads_than_a_grid_dimension():
    # grid.numel = 70000 > 65535: the kernels loop over work items with a grid stride.
    case = dict(shape=(35000, 2, 2, 3, 5, 4, 4), mask="bool_padding", bias="per_head")
    cpu = run(*make_inputs(case, torch.float32, "cpu"))
    cuda = run(*make_inputs(case, torch.float32, "cuda"))
    assert_results_close(cuda, cpu, torch.float32)


def test_current_stream_is_used():
    inputs, grad_out = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")
    expected = run(inputs, grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run(inputs, grad_out)
    side.synchronize()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_torch_compile_on_cuda():
    inputs, _ = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")

    def fn(q, k, v, mask, bias):
        return mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias) * 2

    args = [inputs[n] for n in ("query", "key", "value", "attn_mask", "attn_bias")]
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args))


def test_cpu_mask_with_cuda_query_names_the_argument():
    inputs, _ = make_inputs(CASES["bool_plus_bias"], torch.float32, "cuda")
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    cpu_mask = inputs["attn_mask"].cpu()
    with pytest.raises(ValueError, match="attn_mask must be on the query's device"):
        mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=cpu_mask)
    # The op itself (below the Python checks) reports it too.
    with pytest.raises(ValueError, match="attn_mask must be on the query's device"):
        torch.ops.mha_ext.attention_forward(q, k, v, cpu_mask, None, "none", 1.0)
    with pytest.raises(ValueError, match="attn_bias must be on the query's device"):
        torch.ops.mha_ext.attention_forward(q, k, v, None, inputs["attn_bias"].cpu(), "none", 1.0)


MEMCHECK_SCRIPT = """
import torch, mha_ext
g = torch.Generator(device="cuda").manual_seed(0)
for dtype, E, Ev in ((torch.float16, 40, 24), (torch.float32, 256, 130), (torch.float64, 8, 8)):
    q = torch.randn(2, 4, 37, E, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 53, E, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 53, Ev, device="cuda", generator=g).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 37, 53, device="cuda", generator=g) > 0.3
    bias = torch.randn(4, 1, 53, device="cuda", generator=g).to(dtype).requires_grad_()
    out = mha_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                               enable_gqa=True)
    out.backward(torch.randn_like(out))
    mha_ext.attention_weights(q.detach(), k.detach(), attn_mask=mask, attn_bias=bias.detach(), enable_gqa=True)
torch.cuda.synchronize()
print("memcheck-script-done")
"""


def compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found is None:
        from torch.utils.cpp_extension import CUDA_HOME

        candidate = os.path.join(CUDA_HOME or "", "bin", "compute-sanitizer")
        found = candidate if os.path.isfile(candidate) else None
    return found


def test_compute_sanitizer_memcheck():
    tool = compute_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", MEMCHECK_SCRIPT],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "memcheck-script-done" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
