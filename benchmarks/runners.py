"""One backend running one batch of tiles, ready to be timed: PyTorch (eager / FP16 CUDA graph) or sr_runtime.

Runtime backends are created through ``sr_runtime.backends.create_backend``,
so the benchmark times exactly the session settings ``Upscaler`` uses. Their
``run`` returns a host array, i.e. GPU backends synchronise and the time
includes the host<->device copies of the tile (not of the noise: the bank is
device-resident).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.models import BenchModel
from benchmarks.timing import Timer, cuda_event_timer, host_timer


@dataclass(frozen=True)
class Target:
    """A backend at a precision on a device, as named in every result row."""

    backend: str
    precision: str
    device: str  # "cpu" or "cuda"

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} ({self.device})"

    @property
    def is_torch(self) -> bool:
        return self.backend.startswith("pytorch")


def reference_target(device: str) -> Target:
    """PyTorch eager FP32: what every speed-up on ``device`` is measured against."""
    return Target("pytorch-eager", "fp32", device)


def all_targets(cuda: bool) -> list[Target]:
    """Every backend the benchmark knows, in report order; the unavailable ones are skipped at run time."""
    out = [reference_target("cpu")]
    if cuda:
        out += [reference_target("cuda"), Target("pytorch-cudagraph", "fp16", "cuda")]
    out += [Target("onnxruntime-cpu", "fp32", "cpu"), Target("onnxruntime-cpu", "fp16", "cpu")]
    out += [
        Target("onnxruntime-cuda", "fp32", "cuda"),
        Target("onnxruntime-cuda", "fp16", "cuda"),
        Target("tensorrt", "fp16", "cuda"),
        Target("tensorrt", "fp32", "cuda"),
    ]
    return out


@dataclass
class Runner:
    """``call()`` runs one batch; ``timer`` times it correctly for its device; ``close()`` frees it."""

    call: Callable[[], object]
    timer: Timer
    close: Callable[[], None]
    notes: list[str] = field(default_factory=list)


class Unavailable(Exception):
    """This target cannot run here (no GPU, no TensorRT, no FP16 graph, capture failed...)."""


def _inputs(model: BenchModel, batch: int, seed: int) -> tuple[np.ndarray, int]:
    c = model.config
    lr = np.random.default_rng(seed).random((batch, 3, c.lr_size, c.lr_size), dtype=np.float32)
    return lr, model.module.noise_dim


def _torch_runner(target: Target, model: BenchModel, batch: int, seed: int) -> Runner:
    lr_np, noise_dim = _inputs(model, batch, seed)
    if target.device == "cpu":
        module = model.module
        lr, noise = torch.from_numpy(lr_np), torch.zeros(batch, noise_dim)

        def call() -> object:
            with torch.inference_mode():
                return module.sample(lr, noise)

        return Runner(call, host_timer, lambda: None, [f"torch threads {torch.get_num_threads()}"])
    if not torch.cuda.is_available():
        raise Unavailable("torch has no CUDA device")
    gpu_module = copy.deepcopy(model.module).to("cuda").eval()
    lr, noise = torch.from_numpy(lr_np).to("cuda"), torch.zeros(batch, noise_dim, device="cuda")

    def release() -> None:
        gpu_module.to("meta")
        torch.cuda.empty_cache()

    if target.backend == "pytorch-eager":

        def call_eager() -> object:
            with torch.inference_mode():
                return gpu_module.sample(lr, noise)

        return Runner(call_eager, cuda_event_timer, release)

    def step() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            return gpu_module.sample(lr, noise)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as exc:
        release()
        raise Unavailable(f"CUDA graph capture failed: {str(exc).splitlines()[0]}") from exc
    return Runner(graph.replay, cuda_event_timer, release, ["torch.autocast float16, whole sample() in one CUDA graph"])


def _runtime_runner(target: Target, model: BenchModel, batch: int, seed: int) -> Runner:
    from sr_runtime.backends import create_backend
    from sr_runtime.errors import BackendUnavailable, SRModelError
    from sr_runtime.model import load_model_spec
    from sr_runtime.noise import NoiseBank

    spec = load_model_spec(model.model_dir)
    if batch > spec.batch_max:
        raise Unavailable(f"batch {batch} > the model's batch max {spec.batch_max}")
    bank = NoiseBank.create(spec.noise_dim, temperature=0.0, seed=seed, max_batch=batch)
    try:
        backend = create_backend(spec, target.backend, target.precision, bank, (batch,))
    except (BackendUnavailable, SRModelError, ImportError) as exc:
        raise Unavailable(str(exc).splitlines()[0]) from exc
    lr, _ = _inputs(model, batch, seed)
    notes = []
    if target.device == "cuda":
        notes.append("host timing around a synchronous run(): includes the tile's H2D/D2H copies")
    if target.device == "cpu" and target.precision == "fp16":
        notes.append("CPU has no native FP16 math: ORT runs FP16 ops emulated or casts around FP32 kernels")
    return Runner(lambda: backend.run(lr, 0), host_timer, backend.close, notes)


def make_runner(target: Target, model: BenchModel, batch: int, seed: int = 0) -> Runner:
    """A ready runner, or Unavailable with the reason this target cannot run here."""
    if target.is_torch:
        return _torch_runner(target, model, batch, seed)
    return _runtime_runner(target, model, batch, seed)


def gpu_memory_mb() -> dict[str, Any]:
    """Device memory in use (all processes) and torch's own peak allocation, in MiB."""
    free, total = torch.cuda.mem_get_info()
    return {
        "device_used_mb": (total - free) / 2**20,
        "torch_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
    }
