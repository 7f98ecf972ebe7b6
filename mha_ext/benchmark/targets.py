"""The performance targets for mha_ext, checked against a run's rows: each target selects mha_ext's rows by
a predicate and requires every selected ratio (torch time / mha_ext time, measured side by side) to reach a
threshold. On the CPU (RATIO_TARGETS: speed against torch's fused CPU kernel) the ratio is the row's,
against its family's anchor; on CUDA (CUDA_TARGETS: speed against torch's flash and memory-efficient
kernels) it is taken against the torch backend the target names, timed on the same case. The mask-overhead and memory
targets are evaluated from their own sections."""

from __future__ import annotations

import dataclasses
from typing import Callable

from .cases import FORWARD, FORWARD_BACKWARD, HALF, MEMORY_DEFAULT_CASE, MEMORY_TARGET_MIB, Mask
from .results import MASK_OVERHEAD_LIMIT, OK, MaskOverhead, Row, TargetResult

_PLAIN_MASKS = {Mask.NONE.value, Mask.CAUSAL.value, Mask.PADDING.value, Mask.BIAS.value}


@dataclasses.dataclass(frozen=True)
class RatioTarget:
    description: str
    threshold: float
    selects: Callable[[Row], bool]


def _long(row: Row) -> bool:
    return row.len_q >= 512


RATIO_TARGETS = (
    RatioTarget("float32 forward, no/causal/bool/float mask, L >= 512", 1.15,
                lambda r: r.dtype == "float32" and r.direction == FORWARD and r.mask in _PLAIN_MASKS and _long(r)),
    RatioTarget("float32 forward+backward, no/causal/bool/float mask, L >= 512", 1.2,
                lambda r: r.dtype == "float32" and r.direction == FORWARD_BACKWARD and r.mask in _PLAIN_MASKS
                and _long(r)),
    RatioTarget("float32 bool padding mask (50% of keys padded), L >= 512", 1.6,
                lambda r: r.dtype == "float32" and r.mask == Mask.PADDING.value and _long(r)),
    RatioTarget("float32 bias requiring grad (torch falls back to math), L >= 512", 2.5,
                lambda r: r.dtype == "float32" and r.mask == Mask.BIAS_GRAD.value and _long(r)),
    RatioTarget("bfloat16, no/causal/bool/float mask, L >= 512", 1.1,
                lambda r: r.dtype == "bfloat16" and r.mask in _PLAIN_MASKS and _long(r)),
    RatioTarget("decode (L = 1, S >= 4096), any mask and dtype", 1.0,
                lambda r: r.len_q == 1 and r.len_kv >= 4096),
)


@dataclasses.dataclass(frozen=True)
class AgainstTarget:
    description: str
    threshold: float
    against: str  # the implementation whose time on the same case is the numerator
    selects: Callable[[Row], bool]


CUDA_TARGETS = (
    AgainstTarget("fp16/bf16 forward, no mask, E = 64/128, L 1k-16k, vs torch flash", 0.8, "sdpa_flash",
                  lambda r: r.dtype in HALF and r.direction == FORWARD and r.mask == Mask.NONE.value
                  and 1024 <= r.len_q <= 16384 and r.head_dim in (64, 128)),
    AgainstTarget("fp16/bf16 forward with a bool or float mask, vs torch efficient", 1.5, "sdpa_efficient",
                  lambda r: r.dtype in HALF and r.direction == FORWARD
                  and r.mask in (Mask.PADDING.value, Mask.BIAS.value)),
    AgainstTarget("forward+backward with a bias requiring grad, vs torch efficient", 1.5, "sdpa_efficient",
                  lambda r: r.mask == Mask.BIAS_GRAD.value),
    AgainstTarget("float32, vs torch efficient in float32", 1.0, "sdpa_efficient", lambda r: r.dtype == "float32"),
)


def _against_values(target: AgainstTarget, mine: list[Row], rows: list[Row]) -> list[tuple[float, str]]:
    """(torch time / mha_ext time, case) for the selected cases where both ran; failures of mha_ext count 0."""
    theirs = {r.case: r for r in rows if r.implementation == target.against and r.status == OK and r.median_ms}
    values = []
    for row in mine:
        if not target.selects(row) or row.case not in theirs:
            continue
        if row.status != OK or not row.median_ms:
            values.append((0.0, f"{row.case}: {row.status}"))
        else:
            values.append((theirs[row.case].median_ms / row.median_ms, row.case))
    return values


def _verdict(description: str, threshold_text: str, values: list[tuple[float, str]],
             is_good: Callable[[float], bool], higher_is_better: bool) -> TargetResult:
    """``values``: (value, where) pairs; reports the worst one."""
    if not values:
        return TargetResult(description, threshold_text, 0, "not measured in this run", None)
    pick = min if higher_is_better else max
    worst_value, where = pick(values, key=lambda pair: pair[0])
    return TargetResult(description, threshold_text, len(values), f"{worst_value:.2f} ({where})",
                        all(is_good(value) for value, _ in values))


def evaluate_targets(rows: list[Row], overheads: list[MaskOverhead], memory: list[dict],
                     device_type: str = "cpu") -> list[TargetResult]:
    results = []
    mine = [r for r in rows if r.implementation == "mha_ext"]
    if device_type == "cuda":
        for target in CUDA_TARGETS:
            results.append(_verdict(target.description, f"ratio >= {target.threshold}",
                                    _against_values(target, mine, rows), lambda v, t=target.threshold: v >= t,
                                    higher_is_better=True))
        return results
    for target in RATIO_TARGETS:
        selected = [r for r in mine if target.selects(r)]
        values = [(r.ratio if r.status == OK and r.ratio is not None else 0.0,
                   r.case if r.status == OK else f"{r.case}: {r.status}") for r in selected]
        results.append(_verdict(target.description, f"ratio >= {target.threshold}", values,
                                lambda v, t=target.threshold: v >= t, higher_is_better=True))
    results.append(_verdict("masked run vs the same run unmasked (mha_ext time ratio)",
                            f"<= {MASK_OVERHEAD_LIMIT}",
                            [(o.ratio, f"{o.shape}/{o.mask}/{o.direction}/{o.dtype}") for o in overheads],
                            lambda v: v <= MASK_OVERHEAD_LIMIT, higher_is_better=False))
    measured = [(m["growth_mib"], m["case"]) for m in memory
                if m.get("implementation") == "mha_ext" and m.get("growth_mib") is not None
                and m["case"] == MEMORY_DEFAULT_CASE]
    results.append(_verdict("extra memory (peak RSS growth), B=1 H=16 L=S=8192 E=64 forward, mha_ext",
                            f"< {MEMORY_TARGET_MIB:.0f} MiB", measured, lambda v: v < MEMORY_TARGET_MIB,
                            higher_is_better=False))
    return results
