"""Repeated timing after warm-up, and the percentiles every result reports.

See docs/design.md, Measuring speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Runs one call and returns its duration in seconds, however the device must be timed.
Timer = Callable[[Callable[[], object]], float]


def host_timer(call: Callable[[], object]) -> float:
    """Wall time of a call that returns only when its work is done (CPU, or a GPU call that syncs)."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def cuda_event_timer(call: Callable[[], object]) -> float:
    """GPU time between two CUDA events around an asynchronous call (never host time)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_interleaved(
    calls: Sequence[tuple[Callable[[], object], Timer]], iters: int, budget_s: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Time each (call, timer) ``iters`` times, round-robin, rotating who goes first each round.

    On a shared machine the load drifts during a run; interleaving spreads the
    drift over every backend instead of charging it to whichever ran last, so
    the ratios between them hold. Stops early once ``budget_s`` is spent and
    every call has two samples (one when ``iters`` is 1). Warm-up is the caller's.

    Returns (timed seconds, process CPU seconds) per call: CPU time (all threads)
    is far less sensitive to other jobs than wall time, though it counts
    spin-waiting threads as work.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    samples: list[list[float]] = [[] for _ in calls]
    cpu: list[list[float]] = [[] for _ in calls]
    t_end = time.perf_counter() + budget_s
    n = len(calls)
    for i in range(iters):
        for k in range(n):
            j = (i + k) % n
            call, timer = calls[j]
            c0 = time.process_time()
            samples[j].append(timer(call))
            cpu[j].append(time.process_time() - c0)
        if i + 1 >= min(2, iters) and time.perf_counter() > t_end:
            break
    return samples, cpu


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Milliseconds: median, p90, p99, mean, min, max and the sample count (percentiles interpolate)."""
    if not samples:
        raise ValueError("no samples")
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "n": int(ms.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }
