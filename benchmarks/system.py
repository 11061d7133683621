"""What a result row must name: the device, the library versions, memory use and the device's peak.

The peak is *measured* in the same run (a large matmul), not looked up, so an
achieved-FLOP/s fraction compares two numbers taken under the same load.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """Cores this process may run on (affinity-aware), the figure ONNX Runtime's threads follow."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1/5/15-minute load: recorded because other jobs share the CPU and skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_names() -> list[str]:
    """CUDA device names as torch sees them (empty without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def host_info() -> dict[str, Any]:
    """The machine a result was taken on."""
    try:
        import torch

        torch_threads: int | None = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch_threads,
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Library versions that change the numbers (None = not installed)."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "ncnn"):
        out[dist] = _version(dist)
    try:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def _status_kb(key: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers one backend only.

    Writing 5 to /proc/self/clear_refs does that on Linux >= 4.0; elsewhere the
    reading stays the process's lifetime peak (``rss_scope`` says which).
    """
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> tuple[float | None, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc/self/status."""
    cur, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
    if peak is None:
        import resource  # ru_maxrss: KiB on Linux, the lifetime peak

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (None if cur is None else cur / 1024, peak / 1024)


def matmul_peak(device: str = "cpu", dtype: str = "float32", n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Achievable dense FLOP/s on ``device``: the best of ``repeats`` n x n matmuls (2 n^3 flop each).

    This is the reference the model's achieved GFLOP/s is compared with; it is a
    measurement under the same load, not the vendor's datasheet figure.
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {
        "method": f"torch.mm {n}x{n} {dtype} on {device}, {torch.get_num_threads() if device == 'cpu' else 'all'} "
        f"threads, best of {repeats} after 2 warm-up calls, 2*n^3 flop per call",
        "gflops": max(rates),
        "gflops_median": statistics.median(rates),
    }
