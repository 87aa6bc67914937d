"""What every benchmark shares: the median time of repeated runs, peak memory, a fresh process per
measurement on CPU, and whether an implementation to compare with is installed.

Timings are the median of `repeats` runs after one warm-up. Peak memory is max_memory_allocated on
CUDA; on CPU each measurement runs in a fresh process and we report how much its peak resident set
grew over the runs (weights and imports excluded).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

MEMORY_MEASURES = {"cuda": "torch.cuda.max_memory_allocated over the training steps",
                   "cpu": "growth of the peak resident set over the training steps, in a fresh process "
                          "(weights, inputs and imports excluded)"}


def timed(step, repeats: int, device: torch.device) -> float:
    """Median seconds of `step()` over `repeats` runs, after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_with_peak(step, repeats: int, device: torch.device) -> tuple[float, int]:
    """`timed`, and the peak memory of the runs: max_memory_allocated on CUDA, growth of the peak
    resident set on CPU (meaningful in a fresh process: see `isolated`)."""
    before = _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes() - before
    return seconds, peak


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def isolated(fn, *args, device: str = "cpu"):
    """fn(*args), in a fresh process on CPU so that its peak resident set is its own. A process that
    is killed (the out-of-memory killer, typically) is an error, not a wait for a result that never
    comes, as it would be with multiprocessing.Pool, which quietly replaces dead workers."""
    if device != "cpu":
        return fn(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the process measuring {args[0]} was killed, most likely for lack of memory "
                f"({_total_memory()} here); measure smaller plans (a 2d configuration, or plans from "
                "`nnunet-ext plan` for a smaller memory target) or use a machine with more memory") from None


def _total_memory() -> str:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return f"{pages * page_size / 2 ** 30:.0f} GB of RAM"


def importable(module: str) -> bool:
    """Whether an optional implementation to compare with is installed."""
    return importlib.util.find_spec(module) is not None
