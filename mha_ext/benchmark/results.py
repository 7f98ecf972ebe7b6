"""The benchmark's result records: one :class:`Row` per (case, implementation); the mask-overhead
comparison derived from mha_ext's rows (masked time / unmasked time, same inputs, timed side by side);
target verdicts; and :class:`RunResult`, everything one run produced (what results.json holds)."""

from __future__ import annotations

import dataclasses

from .cases import Case, Mask

OK = "ok"  # timed; the output matched the torch reference (or is the reference)
MISMATCH = "mismatch"  # the output differs from torch's: not timed
REFUSED = "refused"  # the implementation does not support the case
SKIPPED = "skipped"  # not run here (too slow / too much memory at this size)
ERROR = "error"  # raised something unexpected

MASK_OVERHEAD_LIMIT = 1.10
MASK_OVERHEAD_IMPLEMENTATION = "mha_ext"
# Masks whose cost is compared with no mask (dropout is not a mask).
OVERHEAD_MASKS = (Mask.CAUSAL, Mask.PADDING, Mask.BIAS, Mask.BIAS_GRAD, Mask.PADDING_BIAS)


@dataclasses.dataclass
class Row:
    case: str
    shape: str
    mask: str
    direction: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_kv: int
    head_dim: int
    head_dim_v: int
    implementation: str
    family: str
    status: str
    note: str = ""
    median_ms: float | None = None
    min_ms: float | None = None
    repeats: int = 0
    gflops: float | None = None
    percent_of_peak: float | None = None
    ratio: float | None = None  # anchor median time / this row's median time (> 1: faster than the anchor)
    anchor: str | None = None
    check_error: float | None = None
    # mha_ext rows of masked cases: mha_ext's median on the same inputs without the mask, timed interleaved
    # in the same case (the mask-overhead baseline)
    unmasked_ms: float | None = None

    @classmethod
    def for_case(cls, case: Case, implementation: str, family: str, status: str, note: str = "") -> "Row":
        s = case.shape
        return cls(case.id, s.name, case.mask.value, case.direction, case.dtype, s.batch, s.heads_q, s.heads_kv,
                   s.len_q, s.len_kv, s.head_dim, s.head_dim_v, implementation, family, status, note)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MaskOverhead:
    shape: str
    mask: str
    direction: str
    dtype: str
    masked_ms: float
    unmasked_ms: float

    @property
    def ratio(self) -> float:
        return self.masked_ms / self.unmasked_ms

    @property
    def within_limit(self) -> bool:
        return self.ratio <= MASK_OVERHEAD_LIMIT

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "within_limit": self.within_limit}


def mask_overheads(rows: list[Row]) -> list[MaskOverhead]:
    """mha_ext's masked time over its unmasked time, both measured side by side in the masked case."""
    return [MaskOverhead(r.shape, r.mask, r.direction, r.dtype, r.median_ms, r.unmasked_ms) for r in rows
            if r.implementation == MASK_OVERHEAD_IMPLEMENTATION and r.status == OK and r.median_ms
            and r.unmasked_ms]


@dataclasses.dataclass
class TargetResult:
    description: str
    threshold: str
    rows: int
    worst: str  # the worst value and where, or why there is none
    passed: bool | None  # None: nothing measured
    note: str = ""  # why there is no verdict, where a mode says so (--varlen)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunResult:
    command: str
    date: str
    environment: dict
    reference_gemm: dict | None  # sgemm.GemmRate.as_dict()
    settings: dict
    notes: list[str]
    rows: list[Row]
    mask_overhead: list[MaskOverhead]
    targets: list[TargetResult]
    memory: list[dict]  # memory.MemoryResult.as_dict() entries

    @property
    def device_type(self) -> str:
        return self.environment["device"]

    @property
    def peak_label(self) -> str:
        return (self.reference_gemm or {}).get("label", "peak")

    def as_dict(self) -> dict:
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("rows", "mask_overhead", "targets"):
            plain[name] = [item.as_dict() for item in plain[name]]
        return plain
