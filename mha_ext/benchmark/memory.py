"""``--memory``: the extra memory one attention call needs, each (case, implementation) measured in a
fresh Python subprocess so that nothing allocated earlier hides it.

In the child: warm the implementation up on a tiny case of the same kind (loads libraries, starts thread
pools), build the real inputs, reset the peak, make one call, and report the peak's growth.
CPU: peak resident set size, ``VmHWM`` from ``/proc/self/status``, reset by writing 5 to
``/proc/self/clear_refs`` (Linux); where that is impossible, ``ru_maxrss`` (whose peak cannot be reset,
so the growth is only what goes beyond the setup's own peak). CUDA: ``torch.cuda.max_memory_allocated``.
The growth includes the output itself (reported separately, so it can be subtracted).

Run a child by hand: ``python -m mha_ext.benchmark.memory --case long_L8192_E64/none/fwd/float32 --impl mha_ext``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import subprocess
import sys

MIB = 2 ** 20


@dataclasses.dataclass
class MemoryResult:
    case: str
    implementation: str
    device: str
    metric: str = ""
    growth_mib: float | None = None
    output_mib: float | None = None
    inputs_mib: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ in the child

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _PeakMeter:
    """Peak memory since :meth:`start`, in bytes, for the device type."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.note = ""
        if device_type == "cuda":
            self.metric = "peak CUDA memory allocated"
        elif _status_kib("VmHWM") is not None and _reset_peak_rss():
            self.metric = "peak RSS (VmHWM)"
        else:
            self.metric = "peak RSS (ru_maxrss)"
            self.note = "peak could not be reset: growth beyond the setup's peak only"

    def _peak(self) -> int:
        import torch

        if self.device_type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.metric == "peak RSS (VmHWM)":
            return _status_kib("VmHWM") * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.metric == "peak RSS (VmHWM)":
            _reset_peak_rss()
        self.baseline = self._peak()

    def growth(self) -> int:
        return self._peak() - self.baseline


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_here(case_id: str, implementation: str, device: str) -> MemoryResult:
    """The measurement itself; meant to run in a fresh process (see :func:`measure_in_subprocess`)."""
    from .cases import Case
    from .implementations import all_implementations
    from .inputs import make_inputs

    case = Case.from_id(case_id)
    impl = {i.name: i for i in all_implementations()}[implementation]
    device_type = device.split(":")[0]
    result = MemoryResult(case_id, implementation, device)
    meter = _PeakMeter(device_type)
    result.metric, result.note = meter.metric, meter.note
    tiny = dataclasses.replace(case, shape=case.shape.shrunk())
    impl.prepare(make_inputs(tiny, device))()
    inputs = make_inputs(case, device)
    result.inputs_mib = _tensor_bytes(inputs.query, inputs.key, inputs.value, inputs.keep, inputs.bias,
                                      inputs.grad_output) / MIB
    runner = impl.prepare(inputs)
    meter.start()
    outputs = runner()
    result.growth_mib = meter.growth() / MIB
    result.output_mib = _tensor_bytes(outputs.output, *outputs.grads.values()) / MIB
    return result


# ------------------------------------------------------------------------------------------ in the parent

def measure_in_subprocess(case_id: str, implementation: str, device: str, threads: int | None,
                          timeout_s: float = 1800) -> MemoryResult:
    import mha_ext

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mha_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "mha_ext.benchmark.memory", "--case", case_id, "--impl", implementation,
               "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return MemoryResult(case_id, implementation, device, note=f"timed out after {timeout_s:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return MemoryResult(case_id, implementation, device, note=f"failed (exit {done.returncode}): {tail}")
    return MemoryResult(**json.loads(lines[-1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure one attention call's memory growth (child process).")
    parser.add_argument("--case", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = measure_here(args.case, args.impl, args.device)
    except Exception as exc:  # report, not crash: the parent shows the note in its table
        result = MemoryResult(args.case, args.impl, args.device, note=f"{type(exc).__name__}: {exc}"[:300])
    print(json.dumps(result.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
