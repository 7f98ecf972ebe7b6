"""Wall-clock timing of several runners on one case, interleaved so that machine noise (other processes,
frequency changes) hits every implementation alike.

CPU: ``time.perf_counter`` around each call. CUDA: ``torch.cuda.Event`` pairs around each call, then
``synchronize`` (the GPU time of the call, without Python launch gaps between calls).
The number of rounds adapts to a per-measurement time budget; each round calls every runner once, in an
order that rotates from round to round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from typing import Callable

import torch

from .implementations import Runner


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    budget_s: float  # target time spent timing one implementation on one case
    min_repeats: int
    max_repeats: int
    extra_warmup_below_s: float  # a second warm-up call when the first (checked) call took less than this

    @classmethod
    def quick(cls) -> "TimingPolicy":
        return cls(budget_s=0.03, min_repeats=5, max_repeats=15, extra_warmup_below_s=0.05)

    @classmethod
    def full(cls) -> "TimingPolicy":
        return cls(budget_s=0.6, min_repeats=3, max_repeats=40, extra_warmup_below_s=0.25)


@dataclasses.dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def repeats(self) -> int:
        return len(self.samples_s)


def time_call(fn: Callable[[], object], device_type: str, setting=contextlib.nullcontext) -> float:
    """Seconds one call of ``fn`` takes on ``device_type``; ``setting`` is entered outside the timing."""
    with setting():
        if device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def time_interleaved(runners: dict[str, Runner], device_type: str, policy: TimingPolicy,
                     first_call_s: dict[str, float]) -> dict[str, Timing]:
    """Times every runner ``rounds`` times, round-robin. ``first_call_s`` holds each runner's already made
    first (warm-up) call, which sizes the number of rounds."""
    if not runners:
        return {}
    names = list(runners)

    def timed(name: str) -> float:
        return time_call(runners[name].call, device_type, runners[name].setting)

    estimate = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch repeats its backend-selection warnings on every call
        for name in names:  # the smaller of two calls: one hiccup should not cut the repeats short
            estimate[name] = first_call_s[name]
            if first_call_s[name] < policy.extra_warmup_below_s:
                estimate[name] = min(estimate[name], timed(name))
        slowest = max(estimate.values())
        rounds = int(policy.budget_s / max(slowest, 1e-9))
        rounds = max(policy.min_repeats, min(policy.max_repeats, rounds))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(timed(name))
    return {name: Timing(tuple(values)) for name, values in samples.items()}
