"""Everything the benchmark prints or writes except the chart: progress lines while it runs, the final
console table, results JSON and the Markdown report."""

from __future__ import annotations

import json
import os
import sys
import time

from .cases import FLOP_CONVENTION, Case
from .results import OK, MaskOverhead, Row, RunResult, TargetResult

RATIO_EXPLAINED = (
    "ratio = anchor's median time / this row's median time, measured side by side in one process "
    "(> 1: faster than the anchor). Attention rows: anchor sdpa_flash (torch SDPA, flash backend forced; on "
    "the CPU torch's fused CPU kernel), or sdpa_default where flash refuses the case (the anchor column "
    "says which). nn.MultiheadAttention-style rows include the q/k/v/out projections and are compared "
    "with torch's nn_mha (need_weights=False); their GFLOP/s counts attention FLOPs only."
)
MASKS_EXPLAINED = (
    "masks: none; causal (is_causal, top-left); bool_pad50 (bool keep-mask, True = attend, last 50% of "
    "keys padded; nn.MultiheadAttention gets key_padding_mask = ~keep, True = ignore); float_bias "
    "(float (1,H,L,S) added to the scores); bias_grad (the same bias, requiring grad; fwd+bwd only); "
    "bool+bias (both; torch SDPA gets them pre-combined into one float mask, built outside the timing); "
    "dropout10 (no mask, dropout_p=0.1, unchecked)."
)

MODULES_EXPLAINED = (
    "Module rows (nn_mha*, mha_ext_nn_mha*) run on the BERT-like shapes only, with no mask, causal or "
    "padding (as nn.MultiheadAttention users pass masks); math-style implementations "
    "(sdpa_math, naive_per_head, *_weights) are skipped where their score matrices would exceed "
    "--max-scores-mib, and the row says so."
)


def throughput_unit(device_type: str) -> tuple[str, float]:
    """Column unit and the factor that turns GFLOP/s into it."""
    return ("TFLOP/s", 1e-3) if device_type == "cuda" else ("GFLOP/s", 1.0)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


class Progress:
    """Prints one line when a case starts and one per implementation when its measurement is done,
    flushed at once, with elapsed time and a rough estimate of the time left (weighted by FLOPs)."""

    def __init__(self, cases: list[Case], device_type: str, peak_label: str, stream=None):
        self.stream = stream or sys.stdout
        self.cases = cases
        self.weights = [case.flops + 2e8 for case in cases]  # + a fixed per-case overhead
        self.total_weight = sum(self.weights)
        self.done_weight = 0.0
        self.started = time.perf_counter()
        self.unit, self.unit_factor = throughput_unit(device_type)
        self.peak_label = peak_label

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def case_started(self, index: int, case: Case) -> None:
        elapsed = time.perf_counter() - self.started
        eta = ""
        if self.done_weight:
            eta = f", ~{_duration(elapsed * (self.total_weight - self.done_weight) / self.done_weight)} left"
        width = len(str(len(self.cases)))
        self._print(f"[{index + 1:{width}}/{len(self.cases)}] {case.id}  {case.flops / 1e9:,.2f} GFLOP "
                    f"(elapsed {_duration(elapsed)}{eta})")
        self.done_weight += self.weights[index]

    def case_finished(self, rows: list[Row]) -> None:
        for row in rows:
            if row.status == OK and row.median_ms is not None:
                ratio = f"{row.ratio:5.2f}x {row.anchor}" if row.ratio is not None else ""
                if row.unmasked_ms:
                    ratio += f"  (mask overhead {row.median_ms / row.unmasked_ms:.2f})"
                self._print(f"    {row.implementation:24} {row.median_ms:10.3f} ms "
                            f"{row.gflops * self.unit_factor:9.1f} {self.unit} "
                            f"{row.percent_of_peak:5.1f}% {self.peak_label}  {ratio}")
            else:
                self._print(f"    {row.implementation:24} {row.status}: {row.note}")


# ------------------------------------------------------------------------------------------------ table

def _table_cells(row: Row, unit_factor: float) -> list[str]:
    timed = row.status == OK and row.median_ms is not None
    status = "" if row.status == OK else row.status.upper()
    note = " ".join(filter(None, [status, "" if row.note == "reference" else row.note]))
    anchor = {"sdpa_flash": "flash", "sdpa_default": "default*"}.get(row.anchor, row.anchor or "")
    return [
        f"{row.shape}/{row.mask}", row.direction, row.dtype, row.implementation,
        _number(row.median_ms, 3) if timed else "",
        _number(row.gflops * unit_factor, 1 if unit_factor == 1 else 2) if timed else "",
        _number(row.percent_of_peak, 1) if timed else "",
        _number(row.ratio, 2) if timed else "",
        anchor if timed else "",
        note,
    ]


def _headers(unit: str, peak_label: str) -> list[str]:
    return ["case", "dir", "dtype", "implementation", "ms", unit, f"% {peak_label}", "ratio", "anchor", "note"]


def console_table(rows: list[Row], device_type: str, peak_label: str, note_width: int = 70) -> str:
    unit, factor = throughput_unit(device_type)
    headers = _headers(unit, peak_label)
    body = []
    for row in rows:
        cells = _table_cells(row, factor)
        if len(cells[-1]) > note_width:
            cells[-1] = cells[-1][:note_width - 3] + "..."
        body.append(cells)
    widths = [max(len(str(line[i])) for line in [headers] + body) for i in range(len(headers))]
    numeric = {4, 5, 6, 7}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(headers).rstrip(), "  ".join("-" * w for w in widths)]
    previous_case = None
    for row, cells in zip(rows, body):
        if previous_case is not None and row.case != previous_case:
            lines.append("")
        previous_case = row.case
        lines.append(fmt(cells).rstrip())
    return "\n".join(lines)


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def escape(cell):
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


OVERHEAD_HEADERS = ["shape", "mask", "dir", "dtype", "masked ms", "unmasked ms", "masked/unmasked", "<= 1.10"]
TARGET_HEADERS = ["target", "needs", "rows", "worst (where)", "met"]
MEMORY_HEADERS = ["case", "implementation", "peak growth MiB", "output MiB", "inputs MiB", "metric", "note"]


def overhead_lines(overheads: list[MaskOverhead]) -> list[list[str]]:
    return [[o.shape, o.mask, o.direction, o.dtype, f"{o.masked_ms:.3f}", f"{o.unmasked_ms:.3f}", f"{o.ratio:.2f}",
             "yes" if o.within_limit else "NO"] for o in overheads]


def target_lines(targets: list[TargetResult]) -> list[list[str]]:
    verdict = {True: "yes", False: "NO", None: "-"}
    return [[t.description, t.threshold, str(t.rows), t.worst, verdict[t.passed]] for t in targets]


def memory_lines(memory: list[dict]) -> list[list[str]]:
    return [[m["case"], m["implementation"], _number(m.get("growth_mib"), 1), _number(m.get("output_mib"), 1),
             _number(m.get("inputs_mib"), 1), m.get("metric", ""), m.get("note", "")] for m in memory]


def plain_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(line[i])) for line in [headers] + lines) for i in range(len(headers))]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def console_summary(run: RunResult) -> str:
    """The final console output: results table, mask overhead, memory and targets."""
    parts = []
    # --quick's tiny shapes on a busy machine show that everything runs, not whether a target is met: its
    # output leaves the verdicts out rather than print "NO" rows a reader takes for failures.
    quick = bool(run.settings.get("quick"))
    if run.rows:
        parts += ["", console_table(run.rows, run.device_type, run.peak_label)]
    if run.mask_overhead:
        headers, lines = OVERHEAD_HEADERS, overhead_lines(run.mask_overhead)
        if quick:
            headers, lines = headers[:-1], [line[:-1] for line in lines]
        parts += ["", "Mask overhead (mha_ext):", plain_table(headers, lines)]
    if run.memory:
        parts += ["", "Memory:", plain_table(MEMORY_HEADERS, memory_lines(run.memory))]
    if quick:
        parts += ["", "Targets: not judged in --quick runs (tiny shapes); the full suite (./dev.sh bench) checks them."]
        return "\n".join(parts + (["", FLOP_CONVENTION, RATIO_EXPLAINED] if run.rows else []))
    measured, unmeasured = _split_targets(run.targets)
    if measured:
        parts += ["", "Targets:", plain_table(TARGET_HEADERS, target_lines(measured))]
    if unmeasured:
        parts += ["", "Targets not measured in this run: " + "; ".join(t.description for t in unmeasured)]
    if run.rows:
        parts += ["", FLOP_CONVENTION, RATIO_EXPLAINED]
    return "\n".join(parts)


def _split_targets(targets: list[TargetResult]) -> tuple[list[TargetResult], list[TargetResult]]:
    return [t for t in targets if t.rows], [t for t in targets if not t.rows]


# ------------------------------------------------------------------------------------------ files

def environment_lines(run: RunResult) -> list[str]:
    env = run.environment
    lines = [f"command: `{run.command}`", f"date: {run.date}"]
    if env["device"] == "cuda":
        lines.append(f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, sm {env.get('compute_capability')}), "
                     f"driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}")
    busy = env.get("cpu_busy_before_run")
    lines.append(f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch threads: {env['threads']}; at the start: "
                 f"1-minute load average {env.get('load_average_1min')}, CPU busy with other processes "
                 + ("unknown" if busy is None else f"{busy:.0%}"))
    lines.append(f"torch {env['torch']}, Python {env['python']}, {env['platform']}")
    lines.append("mha_ext: " + (", ".join(f"{k}={v}" for k, v in env["mha_ext"].items()) or "no build info"))
    gemm = run.reference_gemm
    if gemm:
        lines.append(f"reference: {gemm['label']} {gemm['size']}x{gemm['size']} {gemm['dtype']}: "
                     f"{gemm['gflops']:,.1f} GFLOP/s (median of {gemm['repeats']}, measured in this run)")
    return lines


def write_report_files(report: dict, out: str, name: str, markdown: str) -> tuple[str, str]:
    """A mode's report as ``out/NAME.json`` (the dict) and ``out/NAME.md`` (its markdown); returns both paths."""
    os.makedirs(out, exist_ok=True)
    json_path, markdown_path = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(markdown_path, "w") as f:
        f.write(markdown)
    return json_path, markdown_path


def write_json(path, run: RunResult) -> None:
    with open(path, "w") as f:
        json.dump(run.as_dict(), f, indent=1, default=str)
        f.write("\n")


def markdown_report(run: RunResult, chart_name: str | None) -> str:
    unit, factor = throughput_unit(run.device_type)
    parts = ["# mha_ext benchmark", ""]
    parts += [f"- {line}" for line in environment_lines(run)]
    if run.rows:
        parts += ["", FLOP_CONVENTION, "", RATIO_EXPLAINED, "", MASKS_EXPLAINED, "", MODULES_EXPLAINED, ""]
        parts += ["Implementations:", ""]
        parts += [f"- `{name}`: {about}" for name, about in run.settings.get("implementations", {}).items()]
    parts += [""]
    if run.notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in run.notes] + [""]
    measured, unmeasured = _split_targets(run.targets)
    if unmeasured:
        parts += ["Targets not measured in this run: " + "; ".join(t.description for t in unmeasured) + ".", ""]
    sections = [
        ("Targets", TARGET_HEADERS, target_lines(measured)),
        ("Mask overhead (mha_ext: masked time / unmasked time, same inputs, timed side by side)", OVERHEAD_HEADERS,
         overhead_lines(run.mask_overhead)),
        ("Memory (each measurement in a fresh subprocess)", MEMORY_HEADERS, memory_lines(run.memory)),
    ]
    for title, headers, lines in sections:
        if lines:
            parts += [f"## {title}", "", _markdown_table(headers, lines), ""]
    if run.rows:
        parts += ["## Results", ""]
        if chart_name:
            parts += [f"![throughput against sequence length]({chart_name})", ""]
        parts += [_markdown_table(_headers(unit, run.peak_label), [_table_cells(r, factor) for r in run.rows]), ""]
    return "\n".join(parts)
