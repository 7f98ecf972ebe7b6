"""``python -m mha_ext.benchmark --distributed``: sequence-parallel attention (:mod:`mha_ext.distributed`) on
1, 2 and 4 local gloo ranks, side by side with the single-process op on the same total work.

Scenarios: ring forward (no mask, contiguous), ring forward causal (zigzag), ring forward+backward (no mask,
contiguous) and Ulysses forward (no mask, contiguous). For each scenario the single-process op
(:func:`mha_ext.scaled_dot_product_attention` on the full tensors, every core's thread) is measured first,
then every world size P, one process group of P local processes each, all in the same run.

Every measurement is a fresh set of processes, forked from a forkserver that has imported torch and mha_ext
(so starting one costs milliseconds, and no process inherits another measurement's memory). Each process:

1. sets ``torch.set_num_threads`` (single process: all the cores; rank: cores // P, at least 1), joins a
   gloo group on 127.0.0.1 (``GLOO_SOCKET_IFNAME=lo``; every collective bounded by ``--timeout``);
2. warms up on tiny shapes, and there checks its shard of the sharded op against the single-process op on the
   gathered tensors (a rank whose shard differs fails the measurement);
3. builds its real inputs (its own shard of the sequence, (B, H, L/P, E)), resets the peak RSS (``VmHWM``
   via ``/proc/self/clear_refs``, mha_ext.benchmark.memory's meter), makes one step while
   :func:`mha_ext.distributed.count_traffic` counts what it sends, and reports the peak's growth and the
   traffic;
4. times ``--repeats`` more steps, each after a barrier, with ``time.perf_counter``.

A row's step time is the median over the repeats of the slowest rank's time (the op is a collective: the
step is done when the last rank is); each rank's own median is kept in the JSON. Written: ``NAME.json`` and
``NAME.md`` in ``--out`` (default benchmarks/out/distributed.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing
import os
import queue
import shlex
import socket
import statistics
import sys
import time
import traceback

import torch

from .cases import FORWARD, FORWARD_BACKWARD, Shape as CaseShape, attention_flops
from .environment import describe, machine_busy_cpu_s, own_cpu_s
from .report import write_report_files
from .results import TargetResult
from .memory import MIB, _PeakMeter, _tensor_bytes

TIME_TARGET = 1.3        # ring forward at P = 2: step time <= 1.3 x the single-process op's
TIME_TARGET_WORLD = 2
MEMORY_TARGET = 1.2      # per-rank growth <= 1.2 x (single-process growth / P + one K/V block)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
CHECK_TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2, "float64": 1e-9}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    scheme: str        # "ring" or "ulysses"
    causal: bool
    layout: str        # "contiguous" or "zigzag"
    backward: bool
    about: str

    @property
    def direction(self) -> str:
        return FORWARD_BACKWARD if self.backward else FORWARD

    @property
    def baseline(self) -> str:
        """The single-process op on the same work (shared by scenarios that differ only in the scheme)."""
        return f"single/{'causal' if self.causal else 'none'}/{self.direction}"


SCENARIOS = (
    Scenario("ring_fwd", "ring", False, "contiguous", False, "ring forward, no mask, contiguous"),
    Scenario("ring_fwd_causal_zigzag", "ring", True, "zigzag", False, "ring forward, causal, zigzag"),
    Scenario("ring_fwd_bwd", "ring", False, "contiguous", True, "ring forward+backward, no mask, contiguous"),
    Scenario("ulysses_fwd", "ulysses", False, "contiguous", False, "Ulysses forward, no mask, contiguous"),
)
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Total problem: query (B, H, L, E), key/value (B, Hkv, L, E); each rank holds L / P of the sequence."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: str

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def kv_block_bytes(self, world_size: int) -> int:
        """One rank's key and value shards: 2 * B * Hkv * (L / P) * E * bytes (what the ring sends per step)."""
        return 2 * self.batch * self.kv_heads * (self.seq_len // world_size) * self.head_dim * self.element_size

    def flops(self, direction: str) -> float:
        shape = CaseShape("distributed", self.batch, self.heads, self.kv_heads, self.seq_len, self.seq_len,
                          self.head_dim, self.head_dim)
        return attention_flops(shape, direction)

    @property
    def about(self) -> str:
        kv = f", Hkv={self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B={self.batch}, H={self.heads}{kv}, L=S={self.seq_len}, E={self.head_dim}, {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement: the single-process op (world_size 0) or a scenario on world_size ranks."""

    scenario: Scenario
    shape: Shape
    world_size: int      # 0: the single-process op, no process group
    threads: int
    repeats: int
    collective_timeout_s: float
    seed: int = 0

    @property
    def processes(self) -> int:
        return max(self.world_size, 1)


# ------------------------------------------------------------------------------------------ in each process

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attention(job: Job):
    """(function, keyword arguments) of the op the job measures."""
    import mha_ext
    from mha_ext.distributed import ring_attention, ulysses_attention

    kwargs = {"is_causal": job.scenario.causal, "enable_gqa": job.shape.kv_heads != job.shape.heads}
    if job.world_size == 0:
        return mha_ext.scaled_dot_product_attention, kwargs
    kwargs["layout"] = job.scenario.layout
    return (ring_attention if job.scenario.scheme == "ring" else ulysses_attention), kwargs


def _make_step(job: Job, query, key, value, grad_output):
    function, kwargs = _attention(job)

    def step():
        if job.scenario.backward:
            out = function(query, key, value, **kwargs)
            out.backward(grad_output)
            return out
        with torch.no_grad():
            return function(query, key, value, **kwargs)

    return step


def _clear_grads(*tensors) -> None:
    for tensor in tensors:
        tensor.grad = None


def _barrier(job: Job) -> None:
    if job.world_size:
        import torch.distributed as dist

        dist.barrier()


def _warm_up_and_check(job: Job, rank: int) -> float | None:
    """One step on tiny shapes (loads the kernels, opens the gloo pairs); on ranks, the largest difference of
    this rank's output (and gradients) from the single-process op's shard on the same tiny inputs."""
    from mha_ext.distributed import shard

    import mha_ext

    shape, dtype = job.shape, DTYPES[job.shape.dtype]
    length = 8 * max(job.world_size, 1)
    generator = _generator(1234)  # the same on every rank: the full tiny tensors

    def randn(heads):
        return torch.randn(shape.batch, heads, length, 16, generator=generator, dtype=torch.float64).to(dtype)

    full = [randn(shape.heads), randn(shape.kv_heads), randn(shape.kv_heads)]
    full_grad = randn(shape.heads)
    if job.world_size == 0:
        _make_step(job, *[t.clone().requires_grad_(job.scenario.backward) for t in full], full_grad)()
        return None
    layout, world = job.scenario.layout, job.world_size
    pieces = [shard(t, layout=layout, rank=rank, world_size=world).clone().requires_grad_(job.scenario.backward)
              for t in full]
    out = _make_step(job, *pieces, shard(full_grad, layout=layout, rank=rank, world_size=world))()
    reference = [t.clone().requires_grad_(job.scenario.backward) for t in full]
    expected = mha_ext.scaled_dot_product_attention(*reference, is_causal=job.scenario.causal,
                                                    enable_gqa=shape.kv_heads != shape.heads)
    pairs = [(out, expected)]
    if job.scenario.backward:
        expected.backward(full_grad)
        pairs += [(mine.grad, theirs.grad) for mine, theirs in zip(pieces, reference)]
    error = 0.0
    for mine, theirs in pairs:
        theirs = shard(theirs.detach(), layout=layout, rank=rank, world_size=world)
        scale = max(theirs.abs().max().item(), 1e-30)
        error = max(error, (mine.detach().double() - theirs.double()).abs().max().item() / scale)
    if not error <= CHECK_TOLERANCE[shape.dtype]:
        raise AssertionError(f"{job.scenario.name} on {world} ranks: rank {rank}'s shard differs from the "
                             f"single-process op by {error:.3g} (relative to its largest value) on tiny inputs")
    return error


def _inputs(job: Job, rank: int):
    """This rank's shard of query, key, value and the output's gradient (the whole tensors in one process)."""
    shape, dtype = job.shape, DTYPES[job.shape.dtype]
    length = shape.seq_len // job.processes
    generator = _generator(job.seed * 1000 + rank + 1)

    def randn(heads, grad):
        return torch.randn(shape.batch, heads, length, shape.head_dim, generator=generator,
                           dtype=dtype).requires_grad_(grad)

    backward = job.scenario.backward
    query, key, value = randn(shape.heads, backward), randn(shape.kv_heads, backward), randn(shape.kv_heads, backward)
    return query, key, value, randn(shape.heads, False) if backward else None


LINK_REPEATS = 5


def _ring_shift_s(job: Job, rank: int) -> list[float]:
    """Seconds one ring shift of one K/V block takes with nothing else running: every rank sends a block to
    the next and receives the previous one's (as ring_attention does at each step), after a barrier."""
    import torch.distributed as dist

    world = job.world_size
    send = torch.ones(job.shape.kv_block_bytes(world), dtype=torch.uint8)
    receive = torch.empty_like(send)
    times = []
    for _ in range(LINK_REPEATS + 1):  # the first one warms the connection up
        _barrier(job)
        begin = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, receive, (rank - 1) % world),
                                        dist.P2POp(dist.isend, send, (rank + 1) % world)])
        for work in works:
            work.wait()
        times.append(time.perf_counter() - begin)
    return times[1:]


def measure(job: Job, rank: int) -> dict:
    """Everything one process measures (see the module docstring)."""
    from mha_ext.distributed import count_traffic

    check_error = _warm_up_and_check(job, rank)
    query, key, value, grad_output = _inputs(job, rank)
    step = _make_step(job, query, key, value, grad_output)
    meter = _PeakMeter("cpu")
    _barrier(job)
    meter.start()
    with count_traffic() as traffic:
        out = step()
    growth = meter.growth()
    output_bytes = _tensor_bytes(out, query.grad, key.grad, value.grad)
    del out
    _clear_grads(query, key, value)
    times = []
    for _ in range(job.repeats):
        _barrier(job)
        begin = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - begin)
        del out
        _clear_grads(query, key, value)
    shift_s = _ring_shift_s(job, rank) if job.world_size > 1 and job.scenario.name == "ring_fwd" else []
    return {"rank": rank, "shift_s": shift_s, "threads": torch.get_num_threads(), "times_s": times,
            "growth_bytes": growth, "metric": meter.metric, "meter_note": meter.note, "output_bytes": output_bytes,
            "inputs_bytes": _tensor_bytes(query, key, value, grad_output), "bytes_sent": traffic.bytes_sent,
            "bytes_received": traffic.bytes_received, "messages": traffic.messages, "check_error": check_error}


MMAP_THRESHOLD = 2 ** 20


def _fix_mmap_threshold() -> bool:
    """glibc malloc: every block of MMAP_THRESHOLD bytes or more gets its own mapping, touched when written and
    returned when freed. By default the threshold rises after each large free, so later large blocks come
    from the heap, which keeps up to twice that freed: the RSS peak of a step then depends on what earlier
    frees left behind (Ulysses at P = 1, L = 4096: 49, 57 and 65 MiB in three runs; 34 to 39 MiB with the
    threshold fixed). Fixed, the peak RSS growth is the peak of the step's live buffers, give or take what the
    op's threads keep in their own arenas. False where there is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _process_main(rank: int, job: Job, port: int, results) -> None:
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on the loopback interface only
        fixed = _fix_mmap_threshold()
        torch.set_num_threads(job.threads)
        if job.world_size:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=job.world_size,
                                    timeout=datetime.timedelta(seconds=job.collective_timeout_s))
        result = measure(job, rank)
        if not fixed:
            result["meter_note"] = (result["meter_note"] + "; " if result["meter_note"] else "") + \
                "malloc's mmap threshold not fixed (no glibc): the peak depends on the heap's history"
        result["cpu_s"] = own_cpu_s()   # this process, all its threads (gloo's included)
        results.put(("ok", rank, result))
        if job.world_size:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, whatever it is)
        results.put(("error", rank, traceback.format_exc()))


# ------------------------------------------------------------------------------------------ in the parent

class MeasurementFailed(RuntimeError):
    """A process raised, or the group did not finish in time."""


_CONTEXT = None


def _context():
    """A forkserver context that has imported torch, mha_ext and this module: each process starts in
    milliseconds, from a server that never computed anything (no thread pools to inherit)."""
    global _CONTEXT
    if _CONTEXT is None:
        import mha_ext

        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mha_ext.__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        methods = multiprocessing.get_all_start_methods()
        _CONTEXT = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "mha_ext", "mha_ext.distributed",
                                             __name__])
    return _CONTEXT


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(job: Job, timeout_s: float) -> tuple[list[dict], float | None]:
    """The job's per-process results in rank order, and the share of the machine's CPU time that other
    processes used meanwhile (None where unknown); raises MeasurementFailed when a process fails or time runs
    out (the other processes are then stopped, not waited for)."""
    busy_before, own_before, began = machine_busy_cpu_s(), own_cpu_s(), time.monotonic()
    context = _context()
    results = context.Queue()
    port = _free_port() if job.world_size else 0
    processes = [context.Process(target=_process_main, args=(rank, job, port, results), daemon=True)
                 for rank in range(job.processes)]
    for process in processes:
        process.start()
    outcome = [None] * job.processes
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(job.processes):
            try:
                status, rank, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise MeasurementFailed(f"did not finish within {timeout_s:.0f} s") from None
            if status == "error":
                raise MeasurementFailed(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
        busy_after, wall = machine_busy_cpu_s(), time.monotonic() - began
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        results.close()
    others = None
    if busy_before is not None and busy_after is not None:
        ours = sum(r["cpu_s"] for r in outcome) + own_cpu_s() - own_before
        others = max(0.0, busy_after - busy_before - ours) / (wall * (os.cpu_count() or 1))
    return outcome, others


@dataclasses.dataclass
class Baseline:
    """The single-process op on the whole tensors."""

    key: str
    threads: int
    step_ms: float | None = None
    samples_ms: list = dataclasses.field(default_factory=list)
    gflops: float | None = None
    growth_mib: float | None = None
    output_mib: float | None = None
    inputs_mib: float | None = None
    others_busy: float | None = None   # share of the machine's CPU time other processes used meanwhile
    note: str = ""


@dataclasses.dataclass
class DistributedRow:
    scenario: str
    about: str
    scheme: str
    layout: str
    causal: bool
    direction: str
    world_size: int
    threads_per_rank: int
    status: str = "ok"
    note: str = ""
    step_ms: float | None = None            # median over repeats of the slowest rank's step
    rank_step_ms: list = dataclasses.field(default_factory=list)   # each rank's own median
    samples_ms: list = dataclasses.field(default_factory=list)     # the slowest rank's time, each repeat
    single_ms: float | None = None
    time_ratio: float | None = None          # step_ms / single_ms (> 1: slower than the single process)
    gflops: float | None = None              # total dense FLOPs / step time
    bytes_sent: list = dataclasses.field(default_factory=list)     # per rank, one step
    bytes_received: list = dataclasses.field(default_factory=list)
    messages: list = dataclasses.field(default_factory=list)
    kv_block_bytes: int = 0
    growth_mib: list = dataclasses.field(default_factory=list)     # per rank, one step's peak RSS growth
    output_mib: float | None = None
    single_growth_mib: float | None = None
    memory_target_mib: float | None = None   # single_growth / P + one K/V block
    memory_ratio: float | None = None        # max per-rank growth / memory_target_mib
    check_error: float | None = None
    others_busy: float | None = None         # share of the machine's CPU time other processes used meanwhile
    shift_ms: float | None = None            # ring_fwd only: one K/V block's ring shift alone (slowest rank, median)
    shift_gbps: float | None = None          # kv_block_bytes / shift time: GB/s each rank sends (and receives)

    @property
    def max_growth_mib(self) -> float | None:
        return max(self.growth_mib) if self.growth_mib else None


def _median_ms(samples_s) -> float:
    return statistics.median(samples_s) * 1e3


def measure_baseline(scenario: Scenario, shape: Shape, settings) -> Baseline:
    baseline = Baseline(scenario.baseline, settings.cores)
    job = Job(scenario, shape, 0, settings.cores, settings.repeats, settings.collective_timeout_s)
    try:
        [result], baseline.others_busy = run_job(job, settings.timeout_s)
    except MeasurementFailed as exc:
        baseline.note = f"failed: {exc}"
        return baseline
    baseline.samples_ms = [t * 1e3 for t in result["times_s"]]
    baseline.step_ms = _median_ms(result["times_s"])
    baseline.gflops = shape.flops(scenario.direction) / (baseline.step_ms * 1e-3) / 1e9
    baseline.growth_mib = result["growth_bytes"] / MIB
    baseline.output_mib = result["output_bytes"] / MIB
    baseline.inputs_mib = result["inputs_bytes"] / MIB
    baseline.note = result["meter_note"]
    return baseline


def measure_row(scenario: Scenario, shape: Shape, world_size: int, baseline: Baseline, settings) -> DistributedRow:
    threads = max(1, settings.cores // world_size)
    row = DistributedRow(scenario.name, scenario.about, scenario.scheme, scenario.layout, scenario.causal,
                         scenario.direction, world_size, threads, kv_block_bytes=shape.kv_block_bytes(world_size))
    if scenario.scheme == "ulysses" and (shape.heads % world_size or shape.kv_heads % world_size):
        row.status, row.note = "skipped", f"Ulysses needs head counts divisible by P = {world_size}"
        return row
    job = Job(scenario, shape, world_size, threads, settings.repeats, settings.collective_timeout_s)
    try:
        results, row.others_busy = run_job(job, settings.timeout_s)
    except MeasurementFailed as exc:
        row.status, row.note = "error", str(exc)
        return row
    slowest = [max(r["times_s"][i] for r in results) for i in range(settings.repeats)]
    row.samples_ms = [t * 1e3 for t in slowest]
    row.step_ms = _median_ms(slowest)
    row.rank_step_ms = [_median_ms(r["times_s"]) for r in results]
    row.gflops = shape.flops(scenario.direction) / (row.step_ms * 1e-3) / 1e9
    row.bytes_sent = [r["bytes_sent"] for r in results]
    row.bytes_received = [r["bytes_received"] for r in results]
    row.messages = [r["messages"] for r in results]
    row.growth_mib = [r["growth_bytes"] / MIB for r in results]
    row.output_mib = max(r["output_bytes"] for r in results) / MIB
    row.check_error = max(r["check_error"] for r in results)
    if results[0]["shift_s"]:
        shifts = [max(r["shift_s"][i] for r in results) for i in range(len(results[0]["shift_s"]))]
        row.shift_ms = _median_ms(shifts)
        row.shift_gbps = row.kv_block_bytes / (row.shift_ms * 1e-3) / 1e9
    notes = {r["meter_note"] for r in results if r["meter_note"]}
    if world_size > settings.cores:
        notes.add(f"{world_size} ranks on {settings.cores} cores: time-shared")
    row.note = "; ".join(sorted(notes))
    if baseline.step_ms:
        row.single_ms = baseline.step_ms
        row.time_ratio = row.step_ms / baseline.step_ms
    if baseline.growth_mib is not None:
        row.single_growth_mib = baseline.growth_mib
        row.memory_target_mib = baseline.growth_mib / world_size + row.kv_block_bytes / MIB
        row.memory_ratio = row.max_growth_mib / row.memory_target_mib
    return row


def evaluate_targets(rows: list[DistributedRow]) -> list[TargetResult]:
    timed = [r for r in rows if r.scenario == "ring_fwd" and r.world_size == TIME_TARGET_WORLD
             and r.time_ratio is not None]
    time_target = TargetResult(f"ring forward at P = {TIME_TARGET_WORLD}: step time / single-process op",
                         f"<= {TIME_TARGET}", len(timed), "", None)
    if timed:
        time_target.worst = f"{max(r.time_ratio for r in timed):.2f}"
        time_target.passed = all(r.time_ratio <= TIME_TARGET for r in timed)
    measured = [r for r in rows if r.memory_ratio is not None]
    memory_target = TargetResult("per-rank peak RSS growth / (single-process growth / P + one K/V block)",
                           f"<= {MEMORY_TARGET}", len(measured), "", None)
    if measured:
        worst = max(measured, key=lambda r: r.memory_ratio)
        memory_target.worst = f"{worst.memory_ratio:.2f} ({worst.scenario}, P={worst.world_size})"
        memory_target.passed = all(r.memory_ratio <= MEMORY_TARGET for r in measured)
    return [time_target, memory_target]


# ------------------------------------------------------------------------------------------ report

def _num(value, digits=1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _mib(values_bytes) -> str:
    if not values_bytes:
        return ""
    low, high = min(values_bytes) / MIB, max(values_bytes) / MIB
    return f"{high:,.2f}" if low == high else f"{low:,.2f}-{high:,.2f}"


def _range(values, digits=1) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    return _num(high, digits) if f"{low:.{digits}f}" == f"{high:.{digits}f}" else \
        f"{_num(low, digits)}-{_num(high, digits)}"


def _percent(fraction) -> str:
    return "" if fraction is None else f"{fraction:.0%}"


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("yes" if passed else "NO")


def header_lines(report: dict) -> list[str]:
    env, settings = report["environment"], report["settings"]
    busy = env.get("cpu_busy_before_run")
    version = env["mha_ext"].get("version", "?")
    return [
        f"command: `{report['command']}`",
        f"date: {report['date']}",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs; {settings['cores']} used); at the start: 1-minute load "
        f"average {env.get('load_average_1min')}, CPU busy with other processes "
        + ("unknown" if busy is None else f"{busy:.0%}"),
        f"torch {env['torch']}, Python {env['python']}, {env['platform']}; mha_ext {version}",
        f"shape (total work): {settings['shape']}; per rank (B, H, L/P, E); gloo on 127.0.0.1 (loopback)",
        f"threads: single-process op {settings['cores']}, each rank max(1, {settings['cores']} // P) "
        "(ranks x threads = cores where P <= cores; above that the ranks time-share the cores)",
        f"timing: one warm-up step on tiny shapes (checked against the single-process op), one step on the real "
        f"shapes (the memory and traffic step), then the median of {settings['repeats']} timed steps, each "
        "after a barrier; a distributed step's time is its slowest rank's",
        f"mha_ext/distributed sources measured: sha256 {settings['distributed_sources_sha256'][:16]} (of its *.py "
        "files, in name order)",
        "memory: glibc's mmap threshold fixed at 1 MiB in every measured process (mallopt), so that the peak RSS "
        "growth is the peak of the step's live buffers",
        f"wall time of the whole run: {report['elapsed_s']:.0f} s",
    ]


EXPLAINED = [
    "Columns: `ms` median step time (distributed: slowest rank; `rank ms` each rank's own median, min-max); "
    "`x single` = ms / the single-process op's ms on the same total work, measured in the same run (> 1: slower); "
    "`GFLOP/s` dense count (causal not halved, forward+backward 3.5x forward) over the step time; "
    "`sent MiB` bytes each rank sent in one step (count_traffic; min-max over ranks), `KV blocks` that over one "
    "K/V block `2*B*Hkv*(L/P)*E*bytes`; `growth MiB` each rank's peak RSS growth during one step (min-max), output "
    "and gradients included; `target MiB` = single-process growth / P + one K/V block; `x target` = the largest "
    "rank's growth / target; `others %` the share of the machine's CPU time that other processes used "
    "during the measurement (/proc/stat's busy time, steal included, less this benchmark's processes' own CPU "
    "time): above a few percent the times are not trustworthy on a 2-core machine.",
]


def markdown_section(report: dict, level: int = 1) -> str:
    h = "#" * level
    parts = [f"{h} mha_ext sequence-parallel benchmark (`--distributed`)", ""]
    parts += [f"- {line}" for line in header_lines(report)]
    parts += ["", *EXPLAINED, ""]
    parts += [f"{h}# Single-process op (mha_ext.scaled_dot_product_attention, {report['settings']['cores']} threads)",
              "", "| work | ms | GFLOP/s | growth MiB | output MiB | inputs MiB | others % | note |",
              "|---|---|---|---|---|---|---|---|"]
    for b in report["baselines"]:
        parts.append(f"| {b['key']} | {_num(b['step_ms'])} | {_num(b['gflops'])} | {_num(b['growth_mib'])} | "
                     f"{_num(b['output_mib'])} | {_num(b['inputs_mib'])} | {_percent(b['others_busy'])} | "
                     f"{b['note']} |")
    parts += ["", f"{h}# Sequence-parallel", "",
              "| scenario | P | threads/rank | ms | rank ms | x single | GFLOP/s | sent MiB | KV blocks | "
              "growth MiB | target MiB | x target | others % | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        blocks = "" if not r["bytes_sent"] or not r["kv_block_bytes"] else \
            _range([b / r["kv_block_bytes"] for b in r["bytes_sent"]], 2)
        note = r["note"] if r["status"] == "ok" else f"{r['status'].upper()} {r['note']}"
        note = note.replace("\n", " ").replace("|", "/")[:300]
        parts.append(
            f"| {r['scenario']} | {r['world_size']} | {r['threads_per_rank']} | {_num(r['step_ms'])} | "
            f"{_range(r['rank_step_ms'])} | {_num(r['time_ratio'], 2)} | {_num(r['gflops'])} | "
            f"{_mib(r['bytes_sent'])} | {blocks} | {_range(r['growth_mib'])} | {_num(r['memory_target_mib'])} | "
            f"{_num(r['memory_ratio'], 2)} | {_percent(r['others_busy'])} | {note} |")
    shifts = [r for r in report["rows"] if r.get("shift_ms")]
    if shifts:
        parts += ["", f"{h}# Ring shift alone (gloo, loopback)", "",
                  "One K/V block sent to the next rank and one received from the previous, all ranks at once, "
                  f"nothing else running (median of {LINK_REPEATS}, slowest rank), against the ring forward's compute "
                  "per step (its step time / P):", "",
                  "| P | block MiB | shift ms | GB/s per rank each way | ring forward ms per step | shift / step |",
                  "|---|---|---|---|---|---|"]
        for r in shifts:
            per_step = r["step_ms"] / r["world_size"]
            parts.append(f"| {r['world_size']} | {r['kv_block_bytes'] / MIB:,.2f} | {_num(r['shift_ms'], 2)} | "
                         f"{_num(r['shift_gbps'], 2)} | {_num(per_step)} | {r['shift_ms'] / per_step:.1%} |")
    parts += ["", f"{h}# Targets (issue 17)", "", "| target | needs | rows | worst | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        parts.append(f"| {t['description']} | {t['threshold']} | {t['rows']} | {t['worst']} | {_verdict(t['passed'])} |")
    return "\n".join(parts) + "\n"


def console_table(report: dict) -> str:
    lines = [f"{'scenario':24} {'P':>2} {'thr':>3} {'ms':>10} {'x single':>8} {'sent MiB':>11} "
             f"{'growth MiB':>13} {'target':>7} {'x tgt':>6} {'others':>6}"]
    for b in report["baselines"]:
        lines.append(f"{b['key']:24} {'-':>2} {report['settings']['cores']:>3} {_num(b['step_ms']):>10} {'':>8} "
                     f"{'':>11} {_num(b['growth_mib']):>13} {'':>7} {'':>6} {_percent(b['others_busy']):>6}")
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['scenario']:24} {r['world_size']:>2} {r['status'].upper()}: "
                         f"{r['note'].splitlines()[-1] if r['note'] else ''}")
            continue
        lines.append(f"{r['scenario']:24} {r['world_size']:>2} {r['threads_per_rank']:>3} {_num(r['step_ms']):>10} "
                     f"{_num(r['time_ratio'], 2):>8} {_mib(r['bytes_sent']):>11} {_range(r['growth_mib']):>13} "
                     f"{_num(r['memory_target_mib']):>7} {_num(r['memory_ratio'], 2):>6} "
                     f"{_percent(r['others_busy']):>6}")
    for t in report["targets"]:
        lines.append(f"target: {t['description']} {t['threshold']}: worst {t['worst'] or '-'} -> "
                     f"{_verdict(t['passed']) or 'not measured'}")
    return "\n".join(lines)


def distributed_sources_sha256() -> str:
    """What was measured: a hash of mha_ext/distributed's Python files (name order)."""
    import hashlib

    import mha_ext.distributed

    folder = os.path.dirname(os.path.abspath(mha_ext.distributed.__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _nothing() -> None:
    pass


def start_processes_server(timeout_s: float) -> None:
    """Starts the forkserver (it imports torch and mha_ext) before anything is measured, so that its start
    is not counted as another process's load."""
    process = _context().Process(target=_nothing, daemon=True)
    process.start()
    process.join(timeout=timeout_s)
    if process.is_alive():
        process.kill()
        raise MeasurementFailed(f"could not start a process within {timeout_s:.0f} s")


# ------------------------------------------------------------------------------------------ command line

def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _name_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [n for n in names if n not in SCENARIO_BY_NAME]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(SCENARIO_BY_NAME)}")
    return names


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mha_ext.benchmark --distributed",
        description="Sequence-parallel attention (ring, Ulysses) on local gloo ranks, side by side with the "
        "single-process op on the same total work: time per step, bytes sent per rank, peak memory per rank.")
    parser.add_argument("--world-sizes", type=_int_list, default=[1, 2, 4], help="comma list (default 1,2,4)")
    parser.add_argument("--scenarios", type=_name_list, default=[s.name for s in SCENARIOS],
                        help="comma list of " + ", ".join(SCENARIO_BY_NAME) + " (default: all)")
    parser.add_argument("--seq-len", type=int, default=8192, help="total sequence length L = S (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="B (default %(default)s)")
    parser.add_argument("--heads", type=int, default=8, help="query heads H (default %(default)s)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=64, help="E (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-ups (default %(default)s)")
    parser.add_argument("--cores", type=int, default=_cores(),
                        help="cores to share out: the single process's threads, cores // P per rank (default: "
                        "this process's CPUs, %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one measurement (one set of processes) may take (default %(default)s)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"), help="output folder (default %(default)s)")
    parser.add_argument("--name", default="distributed", help="output file stem (default %(default)s)")
    return parser


@dataclasses.dataclass(frozen=True)
class Settings:
    cores: int
    repeats: int
    timeout_s: float
    collective_timeout_s: float


def main(argv=None) -> int:
    """``python -m mha_ext.benchmark --distributed [options]``; argv without the ``--distributed`` flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    if any(p < 1 for p in args.world_sizes) or not args.world_sizes:
        parser.error("--world-sizes: positive integers")
    if args.repeats < 1 or args.cores < 1:
        parser.error("--repeats and --cores must be at least 1")
    for p in args.world_sizes:
        if args.seq_len % (2 * p):
            parser.error(f"--seq-len {args.seq_len} must divide into 2 * P = {2 * p} equal chunks (zigzag)")
    shape = Shape(args.batch, args.heads, kv_heads, args.seq_len, args.head_dim, args.dtype)
    settings = Settings(args.cores, args.repeats, args.timeout,
                        collective_timeout_s=max(30.0, min(args.timeout, 300.0)))
    started = time.perf_counter()
    command = shlex.join(["python", "-m", "mha_ext.benchmark", "--distributed"] + argv)
    environment = describe(torch.device("cpu"))
    start_processes_server(min(args.timeout, 120.0))
    print(f"{command}\n{environment['cpu']} ({environment['cpu_count']} CPUs, {args.cores} used), torch "
          f"{environment['torch']}; {shape.about}; world sizes {args.world_sizes}", flush=True)

    baselines: dict[str, Baseline] = {}
    rows: list[DistributedRow] = []
    for name in args.scenarios:
        scenario = SCENARIO_BY_NAME[name]
        if scenario.baseline not in baselines:
            print(f"[{time.perf_counter() - started:5.0f} s] single process: {scenario.baseline} ...", flush=True)
            baselines[scenario.baseline] = baseline = measure_baseline(scenario, shape, settings)
            print(f"    {_num(baseline.step_ms)} ms, {_num(baseline.growth_mib)} MiB growth {baseline.note}"
                  .rstrip(), flush=True)
        for world_size in args.world_sizes:
            print(f"[{time.perf_counter() - started:5.0f} s] {name} on {world_size} rank(s) ...", flush=True)
            row = measure_row(scenario, shape, world_size, baselines[scenario.baseline], settings)
            rows.append(row)
            if row.status == "ok":
                print(f"    {_num(row.step_ms)} ms ({_num(row.time_ratio, 2)}x single), sent "
                      f"{_mib(row.bytes_sent)} MiB/rank, growth {_range(row.growth_mib)} MiB/rank "
                      f"({_num(row.memory_ratio, 2)}x target)", flush=True)
            else:
                print(f"    {row.status}: {row.note}", flush=True)

    report = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": environment,
        "settings": {"cores": args.cores, "repeats": args.repeats, "world_sizes": args.world_sizes,
                     "scenarios": args.scenarios, "shape": shape.about, "shape_fields": dataclasses.asdict(shape),
                     "timeout_s": args.timeout, "collective_timeout_s": settings.collective_timeout_s,
                     "distributed_sources_sha256": distributed_sources_sha256(),
                     "mmap_threshold_bytes": MMAP_THRESHOLD},
        "elapsed_s": time.perf_counter() - started,
        "baselines": [dataclasses.asdict(b) for b in baselines.values()],
        "rows": [dict(dataclasses.asdict(r), max_growth_mib=r.max_growth_mib) for r in rows],
        "targets": [dataclasses.asdict(t) for t in evaluate_targets(rows)],
    }
    json_path, markdown_path = write_report_files(report, args.out, args.name, markdown_section(report))
    print(console_table(report))
    print("wrote", json_path, markdown_path, flush=True)
    return 0 if all(r.status != "error" for r in rows) and all(b.step_ms for b in baselines.values()) else 1
