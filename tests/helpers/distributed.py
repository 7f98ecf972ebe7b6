"""Runs a function on every rank of a gloo process group of local processes (127.0.0.1 only), for the
sequence-parallel tests: the ranks' results come back in rank order, and the first rank that raises fails the
call with its traceback (the others are stopped, not waited for). Every wait is bounded."""

from __future__ import annotations

import datetime
import importlib
import multiprocessing
import os
import queue
import socket
import traceback

import torch


class RankFailed(RuntimeError):
    """A rank raised, or the group did not finish in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, target, args, collective_timeout, results):
    try:
        import torch.distributed as dist

        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on the loopback interface only
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        module, name = target.rsplit(":", 1)
        result = getattr(importlib.import_module(module), name)(*args)
        results.put(("ok", rank, result))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, whatever it is)
        results.put(("error", rank, traceback.format_exc()))


def run_on_ranks(world_size: int, target: str, *args, timeout: float = 240.0, collective_timeout: float = 60.0):
    """[target(*args) on rank 0, ..., on rank world_size - 1]; target is "module:function", importable in a
    fresh process (the tests directory is on its path)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    processes = [context.Process(target=_worker, args=(rank, world_size, port, target, args, collective_timeout,
                                                       results), daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    outcome = [None] * world_size
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        for _ in range(world_size):
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                status, rank, value = results.get(timeout=max(left, 0.1))
            except queue.Empty:
                raise RankFailed(f"{target}: world size {world_size} did not finish within {timeout} s") from None
            if status == "error":
                raise RankFailed(f"{target} failed on rank {rank} of {world_size}:\n{value}")
            outcome[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return outcome
