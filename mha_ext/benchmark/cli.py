"""Command line of ``python -m mha_ext.benchmark`` (see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys

import torch

from . import cases as case_catalog
from .chart import draw_chart
from .environment import busy_warning, describe
from .implementations import select_implementations
from .memory import measure_in_subprocess
from .report import Progress, console_summary, environment_lines, markdown_report, write_json
from .results import RunResult, mask_overheads
from .sgemm import measure_gemm_rate, reference_gemm_spec
from .suite import SuiteSettings, run_suite
from .targets import evaluate_targets
from .timing import TimingPolicy

MEMORY_DEFAULT_IMPLEMENTATIONS = ("mha_ext", "sdpa_flash", "sdpa_default")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mha_ext.benchmark",
        description="Times mha_ext against torch's attention implementations side by side, in one process.")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (well under a minute)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", type=_comma_list, help="comma list: float32,bfloat16 (default: the suite's)")
    parser.add_argument("--direction", type=_comma_list, help="comma list: fwd,fwd+bwd (default: both)")
    parser.add_argument("--filter", help="regular expression searched in case ids shape/mask/direction/dtype")
    parser.add_argument("--case", action="append", metavar="ID",
                        help="run this case id (any known shape/mask/direction/dtype, in or out of the suite; "
                        "repeatable) instead of the suite")
    parser.add_argument("--impls", type=_comma_list, help="comma list of implementations (default: all that run "
                        "on the device; with --memory: " + ",".join(MEMORY_DEFAULT_IMPLEMENTATIONS) + ")")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"), help="output folder (default %(default)s)")
    parser.add_argument("--name", default="results",
                        help="output file stem: NAME.json, NAME.md; chart: chart.png, or NAME.png if NAME is set")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--budget", type=float, help="seconds of timing per implementation and case "
                        "(default 0.6, --quick 0.03)")
    parser.add_argument("--max-scores-mib", type=float, default=128.0,
                        help="skip implementations that materialise (B,H,L,S) fp32 score matrices larger than "
                        "this (default %(default)s)")
    parser.add_argument("--memory", action="store_true",
                        help="instead of timing: peak memory growth of one call per case and implementation, "
                        f"each in a fresh subprocess (default case {case_catalog.MEMORY_DEFAULT_CASE})")
    parser.add_argument("--with-memory", action="store_true",
                        help="after timing, also run the --memory measurement of its default case and "
                        f"implementations ({', '.join(MEMORY_DEFAULT_IMPLEMENTATIONS)}) into the same report")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument("--distributed", action="store_true",
                        help="instead: sequence-parallel attention (mha_ext.distributed) on local gloo ranks against "
                        "the single-process op; its own options: --distributed --help (see distributed.py)")
    parser.add_argument("--varlen", action="store_true",
                        help="instead: packed (varlen) attention on a long-tailed batch of lengths against padding, "
                        "the op and a BERT-size encoder; its own options: --varlen --help (see varlen.py)")
    return parser


def select_cases(args) -> list[case_catalog.Case]:
    dtypes = [case_catalog.normalise_dtype(d) for d in args.dtype] if args.dtype else None
    for direction in args.direction or []:
        if direction not in case_catalog.DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(case_catalog.DIRECTIONS)}")
    if args.case:
        return [case_catalog.Case.from_id(case_id) for case_id in args.case]
    if args.memory and not args.filter:
        return [case_catalog.Case.from_id(case_catalog.MEMORY_DEFAULT_CASE)]
    device_type = torch.device(args.device).type
    selected = case_catalog.suite_cases(args.quick, dtypes, args.direction, device_type)
    if args.memory:  # any case of either suite may be measured
        selected = case_catalog.suite_cases(not args.quick, dtypes, args.direction, device_type) + selected
    if args.filter:
        pattern = re.compile(args.filter)
        selected = [case for case in selected if pattern.search(case.id)]
    return list({case.id: case for case in selected}.values())


def _run_memory(cases, names, args) -> list[dict]:
    results = []
    for case in cases:
        for name in names:
            print(f"memory: {case.id} {name} ...", flush=True)
            result = measure_in_subprocess(case.id, name, args.device, args.threads)
            growth = "" if result.growth_mib is None else f"{result.growth_mib:,.1f} MiB growth"
            print(f"    {growth} {result.note}".rstrip(), flush=True)
            results.append(result.as_dict())
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        from .distributed import main as distributed_main

        return distributed_main([arg for arg in argv if arg != "--distributed"])
    if "--varlen" in argv:
        from .varlen import main as varlen_main

        return varlen_main([arg for arg in argv if arg != "--varlen"])
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cases = select_cases(args)
        names = args.impls or (list(MEMORY_DEFAULT_IMPLEMENTATIONS) if args.memory else None)
        impls, notes = select_implementations(device.type, names)
    except (ValueError, KeyError) as exc:
        parser.error(f"{type(exc).__name__}: {exc}")
    if args.list:
        for case in cases:
            print(f"{case.id:45} {case.flops / 1e9:12,.2f} GFLOP   {case.shape.about}")
        print(f"{len(cases)} cases; implementations: {', '.join(i.name for i in impls)}")
        return 0
    if not cases:
        parser.error("no case matches the selection (try --list)")

    run = RunResult(
        command=shlex.join(["python", "-m", "mha_ext.benchmark"] + argv),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=describe(device),
        reference_gemm=None,
        settings={"quick": args.quick, "device": str(device), "cases": len(cases),
                  "implementations": {i.name: i.description for i in impls}, "max_scores_mib": args.max_scores_mib},
        notes=notes, rows=[], mask_overhead=[], targets=[], memory=[])
    warning = busy_warning(run.environment)
    if warning and not args.memory:
        notes.append(warning)
    for line in environment_lines(run):
        print(line, flush=True)
    for note in notes:
        print("note:", note, flush=True)

    if args.memory:
        run.memory = _run_memory(cases, [i.name for i in impls], args)
    else:
        label, dtype, size = reference_gemm_spec(device.type, args.quick)
        print(f"measuring the reference {label} ({size}x{size} {dtype}) ...", flush=True)
        gemm = measure_gemm_rate(device, args.quick)
        run.reference_gemm = gemm.as_dict()
        print(f"reference {label}: {gemm.gflops:,.1f} GFLOP/s", flush=True)
        policy = TimingPolicy.quick() if args.quick else TimingPolicy.full()
        if args.budget is not None:
            policy = TimingPolicy(args.budget, policy.min_repeats, policy.max_repeats, policy.extra_warmup_below_s)
        run.settings["timing"] = vars(policy)
        settings = SuiteSettings(device, policy, gemm.gflops, int(args.max_scores_mib * 2 ** 20))
        progress = Progress(cases, device.type, label)
        print(f"{len(cases)} cases x {len(impls)} implementations", flush=True)
        run.rows = run_suite(cases, impls, settings, progress)
        run.mask_overhead = mask_overheads(run.rows)
        if args.with_memory:
            run.memory = _run_memory([case_catalog.Case.from_id(case_catalog.MEMORY_DEFAULT_CASE)],
                                     list(MEMORY_DEFAULT_IMPLEMENTATIONS), args)
    run.targets = evaluate_targets(run.rows, run.mask_overhead, run.memory, device.type)

    os.makedirs(args.out, exist_ok=True)
    chart_name = None
    if run.rows and not args.no_chart:
        chart_name = "chart.png" if args.name == "results" else f"{args.name}.png"
        why_not = draw_chart(run.rows, device.type, os.path.join(args.out, chart_name),
                             f"mha_ext benchmark, {run.environment.get('gpu') or run.environment['cpu']}, "
                             f"{run.environment['threads']} threads, torch {run.environment['torch']}")
        if why_not:
            run.notes.append(why_not)
            chart_name = None
    json_path = os.path.join(args.out, f"{args.name}.json")
    markdown_path = os.path.join(args.out, f"{args.name}.md")
    write_json(json_path, run)
    with open(markdown_path, "w") as markdown:
        markdown.write(markdown_report(run, chart_name))
    print(console_summary(run))
    for note in run.notes:
        print("note:", note)
    written = [json_path, markdown_path] + ([os.path.join(args.out, chart_name)] if chart_name else [])
    print("wrote", ", ".join(written), flush=True)
    return 0
