"""This machine's dense matrix-multiply rate, measured in the same run as the attention timings, so the
"% of peak" column is relative to what the machine delivered then: fp32 SGEMM on the CPU, bf16 GEMM on
CUDA (the rate attention kernels there are built on)."""

from __future__ import annotations

import dataclasses
import statistics

import torch

from .timing import time_call


@dataclasses.dataclass(frozen=True)
class GemmRate:
    label: str  # e.g. "SGEMM" or "bf16 GEMM", the column header's reference
    dtype: str
    size: int
    repeats: int
    gflops: float  # median over the repeats

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reference_gemm_spec(device_type: str, quick: bool) -> tuple[str, str, int]:
    """(label, dtype, n) of the reference n x n @ n x n product for a device."""
    if device_type == "cuda":
        return "bf16 GEMM", "bfloat16", 4096 if quick else 8192
    return "SGEMM", "float32", 1024 if quick else 4096


def measure_gemm_rate(device: torch.device | str, quick: bool, min_repeats: int = 3,
                      budget_s: float = 1.0) -> GemmRate:
    device = torch.device(device)
    label, dtype, n = reference_gemm_spec(device.type, quick)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, getattr(torch, dtype))
    b = torch.randn(n, n, generator=generator).to(device, getattr(torch, dtype))
    flops = 2.0 * n ** 3
    with torch.no_grad():
        first = time_call(lambda: torch.mm(a, b), device.type)  # warm-up (library init, page faults)
        first = min(first, time_call(lambda: torch.mm(a, b), device.type))
        repeats = max(min_repeats, min(50, int(budget_s / max(first, 1e-9))))
        samples = [time_call(lambda: torch.mm(a, b), device.type) for _ in range(repeats)]
    return GemmRate(label, dtype, n, repeats, flops / statistics.median(samples) / 1e9)
