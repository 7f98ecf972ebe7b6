"""Runs the cases: for each one, builds its inputs once, prepares every implementation, makes each one's
first call (which warms it up, and tells whether it refuses the case), checks it against the torch
reference, then times all the survivors interleaved and turns the timings into rows."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import torch

from .cases import Case, Mask
from .correctness import compare
from .implementations import ANCHORS, MODULE, Implementation, Outputs, Runner, describe_failure
from .inputs import CaseInputs, make_inputs
from .results import ERROR, MASK_OVERHEAD_IMPLEMENTATION, MISMATCH, OK, OVERHEAD_MASKS, SKIPPED, Row
from .timing import TimingPolicy, time_call, time_interleaved


# The key under which mha_ext's unmasked call is timed alongside a masked case (for the mask overhead).
UNMASKED_BASELINE = MASK_OVERHEAD_IMPLEMENTATION + " without the mask"


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    device: torch.device
    policy: TimingPolicy
    peak_gflops: float  # the reference GEMM rate measured in this run
    max_scores_bytes: int  # implementations that materialise (B, H, L, S) scores are skipped above this


@dataclasses.dataclass
class _FirstCall:
    runner: Runner
    seconds: float
    outputs: Outputs | None


def _first_call(impl: Implementation, inputs: CaseInputs, device_type: str) -> _FirstCall:
    """Prepares ``impl`` for the case and calls it once; raises what it raises, with torch's warnings
    (which carry the reason a forced backend refused) attached as ``exc.warning_messages``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runner = impl.prepare(inputs)
            holder = {}
            seconds = time_call(lambda: holder.setdefault("outputs", runner.call()), device_type, runner.setting)
        except Exception as exc:
            exc.warning_messages = [str(w.message) for w in caught]
            raise
    return _FirstCall(runner, seconds, holder["outputs"])


def _processing_order(impls: list[Implementation]) -> list[Implementation]:
    """Anchors first, in preference order, so the reference exists when the others are checked."""
    anchor_names = [name for names in ANCHORS.values() for name in names]
    rank = {name: i for i, name in enumerate(anchor_names)}
    return sorted(impls, key=lambda impl: rank.get(impl.name, len(rank)))


def _unmasked_baseline(case: Case, impls: list[Implementation], first_calls: dict[str, _FirstCall],
                       device: torch.device) -> _FirstCall | None:
    """For a masked case that mha_ext passed: mha_ext on the same inputs without the mask, to be timed
    interleaved with the rest, so that the mask overhead compares two measurements taken side by side."""
    if case.mask not in OVERHEAD_MASKS or MASK_OVERHEAD_IMPLEMENTATION not in first_calls:
        return None
    impl = next(i for i in impls if i.name == MASK_OVERHEAD_IMPLEMENTATION)
    unmasked = make_inputs(dataclasses.replace(case, mask=Mask.NONE), device)
    try:
        baseline = _first_call(impl, unmasked, device.type)
    except Exception:  # the unmasked case's own row reports the failure
        return None
    baseline.outputs = None
    return baseline


def run_case(case: Case, impls: list[Implementation], settings: SuiteSettings) -> list[Row]:
    """Rows of every implementation that applies to the case (module rows only where
    ``case.runs_modules``), in the order of ``impls``."""
    device_type = settings.device.type
    inputs = make_inputs(case, settings.device)
    rows: dict[str, Row] = {}
    first_calls: dict[str, _FirstCall] = {}
    references: dict[str, tuple[str, Outputs]] = {}  # family -> (anchor name, its outputs)
    attended_rows = inputs.attended_query_rows()

    impls = [impl for impl in impls if impl.family != MODULE or case.runs_modules]
    for impl in _processing_order(impls):
        row = Row.for_case(case, impl.name, impl.family, OK)
        rows[impl.name] = row
        scores_bytes = case.shape.scores_bytes()
        if impl.materialises_scores and scores_bytes > settings.max_scores_bytes:
            row.status = SKIPPED
            row.note = (f"would materialise {scores_bytes / 2**20:,.0f} MiB score matrices "
                        f"(limit {settings.max_scores_bytes / 2**20:,.0f} MiB: --max-scores-mib)")
            continue
        try:
            first = _first_call(impl, inputs, device_type)
        except Exception as exc:
            row.status, row.note = describe_failure(exc, getattr(exc, "warning_messages", []), inputs)
            continue
        reference = references.get(impl.family)
        if reference is None and impl.name in ANCHORS[impl.family]:
            references[impl.family] = (impl.name, first.outputs)
            row.note = "reference"
        elif case.mask is Mask.DROPOUT:
            row.note = "unchecked: dropout is random"
        elif reference is None:
            row.note = "unchecked: no torch reference ran"
        else:
            check = compare(first.outputs, reference[1], case.dtype, attended_rows)
            row.check_error = check.worst_error
            if not check.ok:
                row.status, row.note = MISMATCH, f"differs from {reference[0]}: {check.detail}"
                continue
        first.outputs = None
        first_calls[impl.name] = first
    references.clear()
    baseline = _unmasked_baseline(case, impls, first_calls, settings.device)
    if baseline is not None:
        first_calls[UNMASKED_BASELINE] = baseline

    timings = time_interleaved({name: f.runner for name, f in first_calls.items()}, device_type,
                               settings.policy, {name: f.seconds for name, f in first_calls.items()})
    first_calls.clear()
    baseline_timing = timings.pop(UNMASKED_BASELINE, None)
    if baseline_timing is not None:
        rows[MASK_OVERHEAD_IMPLEMENTATION].unmasked_ms = baseline_timing.median_s * 1e3
    _fill_timed_rows(case, rows, timings, settings.peak_gflops, impls)
    del inputs
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return [rows[impl.name] for impl in impls]


def _fill_timed_rows(case: Case, rows: dict[str, Row], timings: dict, peak_gflops: float,
                     impls: list[Implementation]) -> None:
    """Times, GFLOP/s, % of peak, and each row's ratio against its family's anchor (the first anchor
    candidate that was timed; the anchor's row says why an earlier candidate was passed over)."""
    for name, timing in timings.items():
        row = rows[name]
        row.median_ms, row.min_ms, row.repeats = timing.median_s * 1e3, timing.min_s * 1e3, timing.repeats
        row.gflops = case.flops / timing.median_s / 1e9
        row.percent_of_peak = 100.0 * row.gflops / peak_gflops
    families = {impl.name: impl.family for impl in impls}
    for family, anchor_names in ANCHORS.items():
        anchor = next((n for n in anchor_names if n in timings), None)
        if anchor is None:
            continue
        passed_over = [f"{n} {rows[n].status}: {rows[n].note}"
                       for n in anchor_names[:anchor_names.index(anchor)] if n in rows]
        for name, timing in timings.items():
            if families[name] != family:
                continue
            row = rows[name]
            row.anchor = anchor
            row.ratio = timings[anchor].median_s / timing.median_s
            if passed_over and name == anchor:
                row.note = "; ".join(filter(None, [row.note, "anchor because " + "; ".join(passed_over)]))


def run_suite(cases: list[Case], impls: list[Implementation], settings: SuiteSettings, progress) -> list[Row]:
    """Runs every case; ``progress`` gets ``case_started(index, case)`` and ``case_finished(rows)``."""
    rows = []
    for index, case in enumerate(cases):
        progress.case_started(index, case)
        try:
            case_rows = run_case(case, impls, settings)
        except Exception as exc:  # e.g. out of memory building the inputs: report it, go on
            case_rows = [Row.for_case(case, impl.name, impl.family, ERROR, f"{type(exc).__name__}: {exc}")
                         for impl in impls]
        progress.case_finished(case_rows)
        rows.extend(case_rows)
    return rows

