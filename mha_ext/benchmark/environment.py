"""Describes the machine and software a run measured: CPU model, threads, torch version, GPU and driver,
and mha_ext's build information when the package exposes it."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time

import torch

from mha_ext.info import cpu_model


def _gpu_description(device: torch.device) -> dict:
    properties = torch.cuda.get_device_properties(device)
    info = {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2 ** 30, 1),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown (nvidia-smi unavailable)"
    return info


def _simple(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or (
        isinstance(value, (list, tuple, dict)) and len(str(value)) < 500)


def _call_for_info(function) -> dict:
    try:
        value = function()
    except Exception as exc:
        return {"build_info": f"unavailable ({type(exc).__name__}: {exc})"}
    if isinstance(value, dict):
        return {str(k): v if _simple(v) else str(v) for k, v in value.items()}
    return {"build_info": str(value)}


def mha_ext_build_info() -> dict:
    """``mha_ext.__version__`` and what the package says about its build: ``mha_ext.build_info()``, or
    else an ``mha_ext.info`` module's ``build_info()`` / public plain attributes; guarded throughout."""
    info = {}
    try:
        import mha_ext
    except Exception as exc:
        return {"import": f"failed ({type(exc).__name__})"}
    if hasattr(mha_ext, "__version__"):
        info["version"] = str(mha_ext.__version__)
    if callable(getattr(mha_ext, "build_info", None)):
        return {**info, **_call_for_info(mha_ext.build_info)}
    try:
        from mha_ext import info as module
    except Exception:
        return info
    if callable(getattr(module, "build_info", None)):
        return {**info, **_call_for_info(module.build_info)}
    info.update({name: getattr(module, name) for name in dir(module)
                 if not name.startswith("_") and _simple(getattr(module, name))})
    return info


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)  # idle + iowait


def machine_busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (not idle or waiting for I/O; stolen time counts as busy),
    from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]  # user .. steal (guest is inside user)
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of the machine's CPU time other processes used over ``seconds`` while this one slept."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 1.0 - (after[0] - before[0]) / (after[1] - before[1])


def busy_warning(info: dict) -> str | None:
    """A warning when other processes keep the CPUs busy: torch's threads then wait for each other at
    every parallel region and small cases measure the scheduler, not the kernels."""
    busy = info.get("cpu_busy_before_run")
    if info["device"] == "cpu" and busy is not None and busy > 0.2:
        return (f"the machine is busy (other processes used {busy:.0%} of its CPU time just before the run): "
                f"timings with {info['threads']} threads will be noisy; run when it is quiet, or with --threads 1")
    return None


def describe(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_busy_before_run": cpu_busy_fraction(),
        "mha_ext": mha_ext_build_info(),
    }
    if device.type == "cuda":
        info.update(_gpu_description(device))
    return info
