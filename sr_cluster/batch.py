"""`sr-upscale --ray`: one command's files spread over a pool of Ray actors, one `Upscaler` each.

Why tasks on an actor pool and not Ray Data: every input must end as exactly one
output file or one `failed: <input>: <reason>` line, like the local CLI; each
worker reads its input and writes its output itself (atomically, on a filesystem
all workers share), so no pixels travel through the object store; and resuming
is just "skip the outputs that exist". The driver streams the files, at most
IN_FLIGHT_PER_WORKER per worker, so a million inputs are never submitted at once.

Faults: a worker that dies (killed, OOM, node lost) is restarted by Ray
(`max_restarts`); Ray does not retry its calls (`max_task_retries=0`): the driver
resubmits the files that were in flight on it, unless their outputs already
exist. A file that was *running* each of MAX_ATTEMPTS times its worker died
fails with its own line instead of killing workers forever.

Run as `sr-upscale ... --ray [ADDRESS]` or `python -m sr_cluster.batch ...`: `run` is
registered as the runtime's "ray" runner (`sr_runtime.runners`), so the runtime
reaches it without importing this package. Workers receive the command as
`UpscaleOptions`, plain frozen data.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from tqdm import tqdm

from sr_cluster.address import check_reachable
from sr_runtime.errors import BackendUnavailable, SRModelError, UsageError
from sr_runtime.files import resolved, stale_temp_files
from sr_runtime.jobs import (
    FILE_ERRORS,
    FileNotes,
    FileResult,
    UpscaleOptions,
    check_targets,
    failure_line,
    final_status,
    output_path,
    output_targets,
    run_file,
)
from sr_runtime.model import load_model_spec
from sr_runtime.runners import BatchJob
from sr_runtime.signals import sigterm_as_exit

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are never evaluated at runtime here
    from typing_extensions import Self

#: Files queued on one worker: one running, one waiting, so it never idles for the driver.
IN_FLIGHT_PER_WORKER = 2
#: Deaths of a worker while it ran a file before that file fails; also each worker's restarts.
MAX_ATTEMPTS = 3
#: How long the pool may take to place and load its workers before the job gives up.
START_TIMEOUT_S = 300.0
#: How long an interrupted job waits for its killed workers before removing their temporary files.
STOP_TIMEOUT_S = 15.0
#: Pause between pings of a worker Ray is restarting.
RESTART_POLL_S = 0.2
#: How long resources held at the start are watched for being given back before the plan uses what is free.
FREE_SETTLE_S = 2.0
#: Longest the driver blocks in one `ray.wait`, so Ctrl-C and SIGTERM are handled promptly.
POLL_S = 1.0


@dataclass(frozen=True)
class Placement:
    """How many workers and what each reserves: a GPU, or a share of the CPUs used as ONNX Runtime threads."""

    workers: int
    num_gpus: int
    num_cpus: int
    cpu_threads: int | None

    def describe(self) -> str:
        each = "1 GPU" if self.num_gpus else f"{self.num_cpus} CPU{'s' if self.num_cpus > 1 else ''}"
        return f"{self.workers} Ray worker{'s' if self.workers > 1 else ''}, {each} each"


def plan_placement(
    cluster: dict[str, float], node_cpus: list[float], requested: int | None, free: dict[str, float] | None = None
) -> Placement:
    """One worker per free GPU where the cluster has GPUs; else one per free CPU, each with one intra-op thread.

    On CPUs, per-image parallelism beats intra-op threads for many small files (no
    sync per convolution) and maps one-to-one onto Ray's CPU slots on any node
    size. Fewer workers (`--workers`) each take free_cpus // workers cores, at most
    one node's. Only what is free counts (another application, a service, may hold
    the rest): more workers than free slots would wait for ever, a usage error.
    """
    free = cluster if free is None else free  # None: all of it is free
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    free_gpus, free_cpus = int(free.get("GPU", 0)), int(free.get("CPU", 0))
    if gpus:
        workers = requested or free_gpus
        if not 1 <= workers <= free_gpus:
            raise UsageError(f"--workers {workers}: the Ray cluster has {gpus} GPUs, {free_gpus} free, one per worker")
        return Placement(workers, num_gpus=1, num_cpus=1 if free_cpus >= workers else 0, cpu_threads=None)
    workers = requested or free_cpus
    if not 1 <= workers <= free_cpus:
        raise UsageError(
            f"--workers {workers}: the Ray cluster has {cpus} CPUs, {free_cpus} free, at least one per worker"
        )
    share = max(1, min(free_cpus // workers, int(max(node_cpus, default=1))))
    return Placement(workers, num_gpus=0, num_cpus=share, cpu_threads=share)


@dataclass(frozen=True)
class FileJob:
    """One input, the files it writes, and how many times a worker died while running it.

    `src` and `targets` are absolute (a worker's working directory is not the
    driver's); `shown` is the input as the user named it, for messages.
    """

    src: Path
    targets: tuple[Path, ...]  # its output first, then the std map with --std-map
    order: int  # its place among the inputs: failure lines are printed in input order, as locally
    shown: Path
    deaths: int = 0

    @classmethod
    def absolute(cls, src: Path, targets: tuple[Path, ...], order: int) -> FileJob:
        """`src`'s job, its paths made absolute against this (the driver's) working directory."""
        return cls(src.absolute(), tuple(t.absolute() for t in targets), order, shown=src)

    def as_given(self, text: str) -> str:
        """`text` with the absolute input path written as the user gave it, so lines read as the local CLI's."""
        return text.replace(str(self.src), str(self.shown))

    def done(self) -> bool:
        """Every output is a file of its own: complete, since outputs are only ever renamed into place.

        A symlink is not an output this tool wrote (it may point at anything): the file is redone,
        and the rename replaces the link, not what it points at.
        """
        return all(t.is_file() and not t.is_symlink() for t in self.targets)

    def remove_leftovers(self) -> None:
        """Delete the temporary files a killed attempt at this file left (call only while none runs it)."""
        for target in self.targets:
            for leftover in stale_temp_files(target):
                leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker loaded, or why it could not."""

    model: str = ""
    backend: str = ""
    precision: str = ""
    max_samples: int = 0
    error: str | None = None


class UpscaleWorker:
    """A Ray actor holding one Upscaler built from the command's options (Ray reruns this on a restart)."""

    def __init__(self, options: UpscaleOptions, cpu_threads: int | None) -> None:
        self._options = options
        try:
            self._upscaler = options.build_upscaler(cpu_threads)
            self._error: str | None = None
        except (SRModelError, BackendUnavailable, ValueError, TypeError) as exc:
            self._error = str(exc)

    def info(self) -> WorkerInfo:
        if self._error is not None:
            return WorkerInfo(error=self._error)
        up = self._upscaler
        return WorkerInfo(up.spec.name, up.backend, up.precision, up.max_samples)

    def upscale(self, job: FileJob) -> FileResult:
        """Upscale one file; a killed earlier attempt's temporary files go first (this worker owns them now)."""
        job.remove_leftovers()
        result = run_file(self._upscaler, job.src, job.targets, self._options)
        if result.notes is None:
            return FileResult(failure=None if result.failure is None else job.as_given(result.failure))
        notes = result.notes
        return FileResult(
            notes=FileNotes(
                [job.as_given(w) for w in notes.warnings], None if notes.timing is None else job.as_given(notes.timing)
            )
        )


@dataclass
class Summary:
    """What one run did, for its last line."""

    done: int = 0
    skipped: int = 0
    resubmitted: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (input order, line)

    def fail(self, order: int, line: str) -> None:
        self.failures.append((order, line))

    def failure_lines(self) -> list[str]:
        """In input order whatever order the workers finished in, so they read as the local CLI's."""
        return [line for _, line in sorted(self.failures, key=lambda item: item[0])]


def plan_jobs(sources: Sequence[Path], options: UpscaleOptions, summary: Summary) -> list[FileJob]:
    """The files still to do, with the local CLI's output checks; files whose outputs exist count as skipped."""
    inputs = {resolved(p) for p in sources}  # as the local CLI: a symlink-loop input fails on its own line
    claimed: set[Path] = set()
    jobs: list[FileJob] = []
    for order, src in enumerate(sources):
        targets = output_targets(output_path(src, options), options)
        job = FileJob.absolute(src, targets, order)
        try:
            check_targets(src, targets, inputs, claimed)  # the paths as given, for its messages
        except FILE_ERRORS as exc:
            summary.fail(order, failure_line(src, exc))
            continue
        claimed.update(resolved(t) for t in job.targets)  # claimed at dispatch: files run concurrently
        if job.done():
            summary.skipped += 1
        else:
            jobs.append(job)
    return jobs


class WorkerState(enum.Enum):
    """UP takes files; RESTARTING (Ray is restarting it) takes none until a ping answers; DEAD never again."""

    UP = "up"
    RESTARTING = "restarting"
    DEAD = "dead"


class WorkerPool:
    """The actors and the files in flight on each; feeds them from a queue and resubmits a dead worker's files."""

    def __init__(self, options: UpscaleOptions, placement: Placement) -> None:
        remote = ray.remote(UpscaleWorker)
        run_id = uuid.uuid4().hex[:8]  # named, so an operator (or a fault test) can find and kill one
        self.actors: list[Any] = [
            remote.options(
                name=f"sr-upscale-{run_id}-{i}",
                num_cpus=placement.num_cpus,
                num_gpus=placement.num_gpus,
                max_restarts=MAX_ATTEMPTS,
                max_task_retries=0,
            ).remote(options, placement.cpu_threads)
            for i in range(placement.workers)
        ]
        self._in_flight: dict[Any, tuple[int, FileJob]] = {}  # ObjectRef -> (actor index, job)
        self._order: list[deque[Any]] = [deque() for _ in self.actors]  # each actor's refs, oldest (running) first
        self._state = [WorkerState.UP] * len(self.actors)
        self._pings: dict[Any, int] = {}  # ObjectRef of `info` -> index of a restarting actor

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> list[WorkerInfo]:
        """Wait for every worker to load its model; UsageError if they cannot be placed in time."""
        refs = [actor.info.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if len(ready) < len(refs):
            raise UsageError(
                f"only {len(ready)} of {len(refs)} Ray workers started within {START_TIMEOUT_S:.0f} s "
                "(the cluster is busy or lacks the resources)"
            )
        infos: list[WorkerInfo] = ray.get(refs)
        return infos

    def run(self, queue: deque[FileJob], summary: Summary, bar: tqdm) -> None:
        """Until the queue is empty and nothing is in flight: keep every live worker fed, collect results."""
        while queue or self._in_flight:
            self._feed(queue)
            if not self._in_flight and not self._pings:  # work left but no live worker
                for job in queue:
                    summary.fail(job.order, f"{job.shown}: no Ray worker left to upscale it (all died)")
                queue.clear()
                break
            ready, _ = ray.wait([*self._in_flight, *self._pings], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self._pings:
                    self._answer(ref)
                else:
                    self._collect(ref, queue, summary, bar)

    def _feed(self, queue: deque[FileJob]) -> None:
        for index, actor in enumerate(self.actors):
            while self._state[index] is WorkerState.UP and queue and len(self._order[index]) < IN_FLIGHT_PER_WORKER:
                job = queue.popleft()
                ref = actor.upscale.remote(job)
                self._in_flight[ref] = (index, job)
                self._order[index].append(ref)

    def _collect(self, ref: Any, queue: deque[FileJob], summary: Summary, bar: tqdm) -> None:
        index, job = self._in_flight.pop(ref)
        running = self._order[index][0] == ref  # an actor runs its calls in order: the oldest was running
        self._order[index].remove(ref)
        try:
            outcome: FileResult = ray.get(ref)
        except RayActorError as exc:  # the worker died; ActorDiedError: for good (its restarts are spent)
            self._went_down(index, exc)
            self._retry(replace(job, deaths=job.deaths + running), queue, summary, bar)
            return
        except RayTaskError as exc:  # a bug, not bad input: still one line for this file, the rest go on
            cause = exc.cause if exc.cause is not None else exc
            outcome = FileResult(failure=f"{job.shown}: {type(cause).__name__}: {cause}")
        if outcome.failure is not None:
            summary.fail(job.order, outcome.failure)
        elif outcome.notes is not None:
            outcome.notes.report()
            summary.done += 1
        bar.update()

    def _went_down(self, index: int, exc: RayActorError) -> None:
        """Feed a restarting worker nothing (calls to it would fail at once) until it answers a ping."""
        if isinstance(exc, ActorDiedError):
            self._state[index] = WorkerState.DEAD
        elif self._state[index] is WorkerState.UP:
            self._state[index] = WorkerState.RESTARTING
            self._pings[self.actors[index].info.remote()] = index

    def _answer(self, ping: Any) -> None:
        """A restarting worker's ping came back: up again, still restarting (ping again), or dead."""
        index = self._pings.pop(ping)
        try:
            info: WorkerInfo = ray.get(ping)
        except ActorDiedError:
            self._state[index] = WorkerState.DEAD
            return
        except RayActorError:
            time.sleep(RESTART_POLL_S)
            self._pings[self.actors[index].info.remote()] = index
            return
        self._state[index] = WorkerState.DEAD if info.error is not None else WorkerState.UP

    @staticmethod
    def _retry(job: FileJob, queue: deque[FileJob], summary: Summary, bar: tqdm) -> None:
        """A file whose worker died: done if its outputs made it, failed after MAX_ATTEMPTS, else first in line.

        The dead worker's half-written files go first, whichever way: a requeued file is out of flight,
        so stop() on a SIGTERM would not find it.
        """
        job.remove_leftovers()
        if job.done():
            summary.done += 1
        elif job.deaths >= MAX_ATTEMPTS:
            summary.fail(job.order, f"{job.shown}: its Ray worker died each of the {MAX_ATTEMPTS} times it ran")
        else:
            summary.resubmitted += 1
            queue.appendleft(job)
            return
        bar.update()

    def stop(self) -> None:
        """Kill the workers; once their calls have failed, remove what the interrupted files left half-written."""
        with contextlib.suppress(Exception, SystemExit):  # the cluster itself is going: Ray ends its driver
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self._in_flight:
                ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=STOP_TIMEOUT_S)
        for _, job in self._in_flight.values():
            job.remove_leftovers()


def connect(address: str) -> bool:
    """Join the Ray session this process already has, or the cluster at `address`; True if we connected here.

    ConnectionError at once if nothing listens at an explicit address (Ray would retry for minutes).
    """
    if ray.is_initialized():
        return False
    check_reachable(address)
    ray.init(address=None if address == "auto" else address, logging_level=logging.ERROR)  # Ray's warnings: its logs
    return True


def run(batch: BatchJob) -> int:
    """`sr-upscale --ray`: the exit status of the local CLI (0 / 1 / 2 / 130 / 143) for the same files."""
    summary = Summary(failures=[(-1, f"{name}: {why}") for name, why in batch.unmatched])  # first, as locally
    options = batch.options
    jobs = plan_jobs(batch.sources, options, summary)
    if summary.skipped:
        print(
            f"sr-upscale: {summary.skipped} of {len(batch.sources)} files already done (their outputs exist), skipped",
            file=sys.stderr,
        )
    if not jobs:
        return final_status(summary.failure_lines(), 0)
    try:
        # Resolved here: a worker's environment (no $SR_MODEL_DIR) and working directory are not the driver's.
        model = load_model_spec(options.model).directory.absolute()
        options = replace(options, model=str(model))
        connected_here = connect(batch.address)
    except SRModelError as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"sr-upscale: error: cannot reach the Ray cluster at {batch.address}: {reason}", file=sys.stderr)
        return 2
    except SystemExit:  # SIGTERM while Ray connects: its handler exits with the bare signal number
        print("sr-upscale: interrupted", file=sys.stderr)
        return 143
    # ray.init replaced the SIGTERM handler; the one of a cluster it started here kills that cluster and
    # exits 1, and Ray's teardown after a SIGTERM to the process group can deliver it again.
    signal.signal(signal.SIGTERM, _terminate_once)
    try:
        return _run_pool(options, batch.workers, jobs, summary)
    finally:
        if connected_here:
            ray.shutdown()


def _terminate_once(signum: int, frame: object) -> None:
    """SIGTERM outside the pool's own handling: exit 143 the first time, and ignore repeats (the job is
    already stopping, its status decided)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _run_pool(options: UpscaleOptions, workers: int | None, jobs: list[FileJob], summary: Summary) -> int:
    """Place the workers, stream the files through them, and always kill them at the end."""
    started = time.perf_counter()
    status = 0
    terminated = threading.Event()
    try:
        with sigterm_as_exit(), _noting(terminated):
            nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
            placement = plan_placement(ray.cluster_resources(), nodes, workers, free=free_resources())
            with WorkerPool(options, placement) as pool:
                first = _check_workers(pool.start(), options.samples)
                print(
                    f"sr-upscale: model {first.model}, backend {first.backend} ({first.precision}) on "
                    f"{placement.describe()}",
                    file=sys.stderr,
                )
                with tqdm(total=len(jobs), desc="files", unit="file", disable=options.quiet or None) as bar:
                    pool.run(deque(jobs), summary, bar)
    except UsageError as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        status = 130
    except SystemExit as exc:  # SIGTERM; or Ray ending its driver (code 1) as a signalled cluster goes down
        status = 143 if terminated.is_set() or not isinstance(exc.code, int) else exc.code
    print(
        f"sr-upscale: {summary.done} done, {summary.skipped} skipped as already done, "
        f"{len(summary.failures)} failed, {summary.resubmitted} resubmitted after a worker died "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return final_status(summary.failure_lines(), status)


@contextlib.contextmanager
def _noting(terminated: threading.Event) -> Iterator[None]:
    """Sets `terminated` on SIGTERM, then runs the handler that was there (sigterm_as_exit's: SystemExit)."""
    previous = signal.getsignal(signal.SIGTERM)

    def note(signum: int, frame: Any) -> None:
        terminated.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_resources(settle_s: float = FREE_SETTLE_S) -> dict[str, float]:
    """What the cluster has free; while some is held, watched for `settle_s`, since actors that just ended
    (a previous job's workers) give theirs back a moment later."""
    total = ray.cluster_resources()
    free = ray.available_resources()
    deadline = time.monotonic() + settle_s
    while any(free.get(k, 0.0) < total.get(k, 0.0) for k in ("CPU", "GPU")) and time.monotonic() < deadline:
        time.sleep(0.1)
        now = ray.available_resources()
        free = {k: max(free.get(k, 0.0), now.get(k, 0.0)) for k in {*free, *now}}
    return free


def _check_workers(infos: list[WorkerInfo], samples: int) -> WorkerInfo:
    """The first worker's info; UsageError for a worker that could not load the model or a --samples too large."""
    for info in infos:
        if info.error is not None:
            raise UsageError(info.error)
        if samples > info.max_samples:
            raise UsageError(f"--samples must be at most {info.max_samples} for this model (its noise bank)")
    return infos[0]


if __name__ == "__main__":  # `python -m sr_cluster.batch ARGS` is `sr-upscale ARGS --ray`
    from sr_runtime.cli import main

    argv = sys.argv[1:]
    if not any(arg == "--ray" or arg.startswith("--ray=") for arg in argv):
        argv.append("--ray")
    sys.exit(main(argv))
