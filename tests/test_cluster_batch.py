"""sr-upscale --ray on a real local Ray cluster: same pixels as the local CLI, a killed worker, resume, failures."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime.cli import UsageError, main

pytest.importorskip("ray", reason="Ray is not installed (the `cluster` extra)")

from sr_cluster.batch import (  # after the skip: it imports ray
    MAX_ATTEMPTS,
    START_TIMEOUT_S,
    FileJob,
    Placement,
    Summary,
    WorkerPool,
    plan_placement,
)

SEEDED = ["--temperature", "0.6", "--seed", "5"]
SUMMARY = re.compile(r"sr-upscale: (\d+) done, (\d+) skipped as already done, (\d+) failed, (\d+) resubmitted")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real photo crops, 40x30 .. 70x50, RGB / RGBA / grey, PNG and JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    base = Image.fromarray(photo_lr(96))
    for i in range(20):
        w, h = 40 + (i * 3) % 31, 30 + (i * 7) % 21
        crop = base.crop((i, 2 * i, i + w, 2 * i + h))
        mode, ext = [("RGB", "png"), ("RGBA", "png"), ("L", "png"), ("RGB", "jpg"), ("L", "jpg")][i % 5]
        if mode == "RGBA":
            crop.putalpha(Image.linear_gradient("L").resize(crop.size))
        crop.convert(mode).save(folder / f"p{i:02d}.{ext}")
    return folder


@pytest.fixture(scope="module")
def local_results(double_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The local CLI's outputs of `photos`, at temperature 0 and seeded at 0.6: what --ray must reproduce."""
    results = {}
    for name, flags in (("t0", []), ("seeded", SEEDED)):
        out = tmp_path_factory.mktemp(f"local-{name}")
        assert main(["--model", str(double_model), "-q", str(photos), "-o", str(out), *flags]) == 0
        results[name] = out
    return results


def run_ray(double_model: Path, ray_local: Any, *args: str) -> int:
    """sr-upscale --ray in this process, against the session's local cluster by its address."""
    address = ray_local.get_runtime_context().gcs_address
    return main(["--model", str(double_model), "-q", *args, "--ray", address])


def assert_same_images(folder: Path, expected: Path) -> None:
    """Same file names (so no temporary or duplicate files) and bit-identical decoded pixels."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        with Image.open(path) as want, Image.open(folder / path.name) as got:
            assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want)), path.name


def summary_counts(err: str) -> tuple[int, ...]:
    """(done, skipped, failed, resubmitted) from the driver's last line."""
    match = SUMMARY.search(err)
    assert match, err
    return tuple(int(n) for n in match.groups())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t0", "seeded"])
def test_ray_gives_the_local_pixels(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whichever worker upscales an image, it gets the local CLI's pixels (noise keyed by tile and seed)."""
    flags = SEEDED if name == "seeded" else []
    assert run_ray(double_model, ray_local, str(photos), "-o", str(tmp_path), *flags) == 0
    assert summary_counts(capsys.readouterr().err) == (20, 0, 0, 0)
    assert_same_images(tmp_path, local_results[name])


@pytest.mark.slow
def test_a_killed_worker_loses_and_duplicates_nothing(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Kill a worker (Ray restarts it) once 2 outputs exist: its in-flight files are redone, each output once."""
    killed: list[str] = []
    earlier = set(ray_local.util.list_named_actors())  # earlier tests' workers, if any still listed

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(tmp_path.glob("*_x4.*"))) < 2:
            time.sleep(0.02)
        names = sorted(n for n in set(ray_local.util.list_named_actors()) - earlier if n.startswith("sr-upscale-"))
        if names:
            ray_local.kill(ray_local.get_actor(names[0]), no_restart=False)
            killed.append(names[0])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    assert run_ray(double_model, ray_local, str(photos), "-o", str(tmp_path), *SEEDED) == 0
    killer.join(timeout=10)
    assert killed, "the worker was not killed mid-job"
    done, skipped, failed, resubmitted = summary_counts(capsys.readouterr().err)
    assert (done, skipped, failed) == (20, 0, 0) and resubmitted >= 1
    assert_same_images(tmp_path, local_results["seeded"])


@pytest.mark.parametrize("deaths", [1, MAX_ATTEMPTS])
def test_a_file_whose_worker_died_loses_its_half_written_output(tmp_path: Path, deaths: int) -> None:
    """Requeued or failed for good, the dead worker's temporary file goes at once: a SIGTERM stopping the job
    next only cleans what is still in flight."""
    from collections import deque

    from tqdm import tqdm

    job = FileJob.absolute(tmp_path / "a.png", (tmp_path / "a_x4.png",), 0)
    leftover = tmp_path / ".a_x4.png.0123456789ab.tmp"
    leftover.write_bytes(b"half")
    queue: deque[FileJob] = deque()
    summary = Summary()
    with tqdm(disable=True) as bar:
        WorkerPool._retry(FileJob(job.src, job.targets, 0, job.shown, deaths), queue, summary, bar)
    assert not leftover.exists()
    assert (len(queue), len(summary.failures)) == ((1, 0) if deaths < MAX_ATTEMPTS else (0, 1))


@pytest.mark.slow
def test_resume_does_only_the_missing_outputs(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_ray(double_model, ray_local, str(photos / "p0*"), "-o", str(tmp_path)) == 0  # a partial run
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert len(first) == 10
    leftover = tmp_path / ".p15_x4.png.0123456789ab.tmp"  # what a SIGKILLed writer leaves
    leftover.write_bytes(b"half a png")
    capsys.readouterr()
    assert run_ray(double_model, ray_local, str(photos), "-o", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert "10 of 20 files already done" in err and summary_counts(err) == (10, 10, 0, 0)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in first} == first
    assert_same_images(tmp_path, local_results["t0"])  # the leftover temporary file is gone too


@pytest.mark.slow
def test_resume_redoes_an_output_that_is_a_symlink(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A symlink where an output goes (to any file) is not a finished output: redone, the link replaced;
    a symlink loop there fails that file alone."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes((photos / "p01.png").read_bytes())
    (out / "p00_x4.png").symlink_to(elsewhere)
    assert run_ray(double_model, ray_local, str(photos / "p00.png"), str(photos / "p01.png"), "-o", str(out)) == 0
    assert summary_counts(capsys.readouterr().err) == (2, 0, 0, 0)
    assert not (out / "p00_x4.png").is_symlink() and elsewhere.read_bytes() == (photos / "p01.png").read_bytes()
    (out / "p03_x4.jpg").symlink_to(out / "p03_x4.jpg")  # a loop: that file fails on its own line, the rest go on
    loop_line = (
        f"sr-upscale: failed: {photos / 'p03.jpg'}: output {out / 'p03_x4.jpg'} is a symlink loop; "
        "remove it or choose another -o"
    )
    assert main(["--model", str(double_model), "-q", str(photos / "p03.jpg"), "-o", str(out)]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if "failed:" in line] == [loop_line]
    assert run_ray(double_model, ray_local, str(photos / "p02.png"), str(photos / "p03.jpg"), "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert summary_counts(err) == (1, 0, 1, 0) and "Traceback" not in err
    assert [line for line in err.splitlines() if "failed:" in line] == [loop_line]  # the local CLI's line
    for name in ("p00_x4.png", "p01_x4.png"):
        with Image.open(out / name) as got, Image.open(local_results["t0"] / name) as want:
            assert np.array_equal(np.asarray(got), np.asarray(want)), name


@pytest.mark.slow
def test_a_corrupt_input_fails_with_the_local_line(
    double_model: Path, ray_local: Any, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)  # resolving it raises (before Python 3.13): that input's failure, not the run's
    inputs = [str(photos / "p01.png"), str(broken), str(loop), str(photos / "p03.jpg"), str(tmp_path / "gone.png")]
    assert main(["--model", str(double_model), "-q", *inputs, "-o", str(tmp_path / "local")]) == 1
    local_failures = [line for line in capsys.readouterr().err.splitlines() if "failed:" in line]
    assert run_ray(double_model, ray_local, *inputs, "-o", str(tmp_path / "ray")) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "failed:" in line] == local_failures
    assert len(local_failures) == 3 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["p01_x4.png", "p03_x4.jpg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "one.png", "--ray"], "is a file but there are 20 inputs"),
        (["--ray", "--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2"], "needs --ray"),
        (["--ray", "no address here"], "expected host:port"),
        (["--ray", "--model", "/nonexistent/model"], "no model manifest"),
    ],
)
def test_usage_errors_exit_2_before_any_work(
    double_model: Path,
    photos: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(double_model), "-q", str(photos), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and not list(photos.glob("*_x4.*"))


def test_more_workers_than_the_cluster_holds_is_a_usage_error(
    double_model: Path, ray_local: Any, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_ray(double_model, ray_local, str(photos), "-o", str(tmp_path), "--workers", "3") == 2
    assert "the Ray cluster has 2 CPUs" in capsys.readouterr().err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_without_the_cluster_extra_one_line_and_exit_2(
    double_model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "sr_cluster.batch")
    assert main(["--model", str(double_model), str(photos), "--ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sr-upscale: error: --ray needs the cluster extra: pip install 'vdvae-sr[cluster]'"
    ]


@pytest.mark.parametrize(
    ("cluster", "free", "nodes", "requested", "expected"),
    [
        ({"CPU": 16.0, "GPU": 4.0}, None, [8.0, 8.0], None, Placement(4, num_gpus=1, num_cpus=1, cpu_threads=None)),
        ({"CPU": 16.0}, None, [8.0, 8.0], None, Placement(16, num_gpus=0, num_cpus=1, cpu_threads=1)),
        ({"CPU": 16.0}, None, [8.0, 8.0], 4, Placement(4, num_gpus=0, num_cpus=4, cpu_threads=4)),
        ({"CPU": 16.0}, None, [8.0, 8.0], 1, Placement(1, num_gpus=0, num_cpus=8, cpu_threads=8)),  # a node's worth
        ({"CPU": 2.0}, None, [2.0], 1, Placement(1, num_gpus=0, num_cpus=2, cpu_threads=2)),
        # another application holds one of two CPUs: only the free one is planned for
        ({"CPU": 2.0}, {"CPU": 1.0}, [2.0], None, Placement(1, num_gpus=0, num_cpus=1, cpu_threads=1)),
        ({"CPU": 2.0}, {"CPU": 1.0}, [2.0], 1, Placement(1, num_gpus=0, num_cpus=1, cpu_threads=1)),
        (
            {"CPU": 16.0, "GPU": 4.0},
            {"CPU": 0.0, "GPU": 2.0},
            [16.0],
            None,
            Placement(2, num_gpus=1, num_cpus=0, cpu_threads=None),
        ),
    ],
)
def test_placement_one_worker_per_gpu_else_a_share_of_the_cpus(
    cluster: dict[str, float],
    free: dict[str, float] | None,
    nodes: list[float],
    requested: int | None,
    expected: Placement,
) -> None:
    assert plan_placement(cluster, nodes, requested, free=free) == expected


def test_placement_refuses_what_is_not_free() -> None:
    with pytest.raises(UsageError, match="2 CPUs, 0 free"):
        plan_placement({"CPU": 2.0}, [2.0], None, free={"CPU": 0.0})
    with pytest.raises(UsageError, match="2 CPUs, 1 free"):
        plan_placement({"CPU": 2.0}, [2.0], 2, free={"CPU": 1.0})


def test_placement_refuses_more_workers_than_gpus() -> None:
    with pytest.raises(UsageError, match="2 GPUs"):
        plan_placement({"CPU": 8.0, "GPU": 2.0}, [8.0], 3)


@pytest.mark.slow
def test_relative_paths_mean_the_drivers_files(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Inputs and -o relative to the driver's working directory, not the workers' (which is elsewhere)."""
    (tmp_path / "in").mkdir()
    for name in ("p00.png", "p03.jpg"):
        (tmp_path / "in" / name).write_bytes((photos / name).read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(double_model), "-q", "in/broken.png", "-o", "local"]) == 1
    local_failure = [line for line in capsys.readouterr().err.splitlines() if "failed:" in line]
    assert run_ray(double_model, ray_local, "in/p00.png", "in/p03.jpg", "in/broken.png", "-o", "out") == 1
    err = capsys.readouterr().err
    assert summary_counts(err) == (2, 0, 1, 0)
    assert [line for line in err.splitlines() if "failed:" in line] == local_failure  # named as given
    assert local_failure[0].startswith("sr-upscale: failed: in/broken.png: ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p00_x4.png", "p03_x4.jpg"]
    for name in ("p00_x4.png", "p03_x4.jpg"):
        with Image.open(tmp_path / "out" / name) as got, Image.open(local_results["t0"] / name) as want:
            assert np.array_equal(np.asarray(got), np.asarray(want)), name


@pytest.mark.slow
def test_model_dir_from_the_environment_reaches_the_workers(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """$SR_MODEL_DIR set on the driver only (the cluster started without it): workers still use that model."""
    monkeypatch.setenv("SR_MODEL_DIR", str(double_model))
    address = ray_local.get_runtime_context().gcs_address
    assert main(["-q", str(photos / "p00.png"), str(photos / "p01.png"), "-o", str(tmp_path), "--ray", address]) == 0
    assert "model test-double" in capsys.readouterr().err
    for name in ("p00_x4.png", "p01_x4.png"):
        with Image.open(tmp_path / name) as got, Image.open(local_results["t0"] / name) as want:
            assert np.array_equal(np.asarray(got), np.asarray(want)), name


def test_an_address_where_nothing_listens_fails_at_once(double_model: Path, photos: Path, tmp_path: Path) -> None:
    """Ray would retry such an address for minutes (deaf to SIGTERM); one line and exit 2 instead.
    In a process of its own: this one may have joined the test cluster, which --ray would use."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        for how in (["--ray", f"127.0.0.1:{port}"], ["--ray"]):
            env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}  # what plain --ray (auto) dials
            t0 = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sr_runtime.cli",
                    "--model",
                    str(double_model),
                    "-q",
                    str(photos / "p00.png"),
                    "-o",
                    str(tmp_path),
                    *how,
                ],
                check=False,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert done.returncode == 2 and time.monotonic() - t0 < 20, done.stderr
            assert done.stderr.strip().splitlines() == [
                (
                    f"sr-upscale: error: cannot reach the Ray cluster at {how[-1] if len(how) > 1 else 'auto'}: "
                    f"nothing answers at 127.0.0.1:{port} (Connection refused)"
                )
            ]


@pytest.mark.slow
def test_workers_fit_in_what_another_application_leaves(
    double_model: Path,
    ray_local: Any,
    photos: Path,
    tmp_path: Path,
    local_results: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An actor holding one of the cluster's two CPUs (a service, say): the default is one worker on the
    free CPU, and --workers 1 asks for that one CPU only, instead of waiting for a slot that cannot come."""

    @ray_local.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # type: ignore[attr-defined]
    try:
        assert ray_local.get(holder.ready.remote(), timeout=60)
        for i, flags in enumerate(([], ["--workers", "1"])):
            t0 = time.monotonic()
            out = tmp_path / str(i)
            assert run_ray(double_model, ray_local, str(photos / "p0[0-3]*"), "-o", str(out), *flags) == 0
            assert time.monotonic() - t0 < 60
            assert "on 1 Ray worker, 1 CPU each" in capsys.readouterr().err
            for path in out.iterdir():
                with Image.open(path) as got, Image.open(local_results["t0"] / path.name) as want:
                    assert np.array_equal(np.asarray(got), np.asarray(want)), path.name
    finally:
        ray_local.kill(holder)


@pytest.mark.slow
def test_sigterm_to_the_process_group_exits_143(double_model: Path, tmp_path: Path) -> None:
    """`sr-upscale --ray` that started its own local cluster, SIGTERM to its process group (as a shell or a
    supervisor sends it) mid-job: exit 143, no temporary file left. The dying cluster made Ray end its
    driver with SystemExit(1), read as the exit status in most runs; two runs, since it is a race."""
    photos = tmp_path / "big"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((400, 400, 3)) * 255).astype(np.uint8)).save(photos / f"b{i}.png")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local cluster, not the test's
    env["RAY_agent_register_timeout_ms"] = "180000"
    for trial in range(2):
        out, log = tmp_path / f"out{trial}", tmp_path / f"log{trial}"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sr_runtime.cli",
                    "--model",
                    str(double_model),
                    "-q",
                    str(photos),
                    "-o",
                    str(out),
                    "--ray",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S + 60  # a fresh cluster on a loaded machine, then its workers
            while "Ray worker" not in log.read_text() or not out.exists():  # workers up, files being written
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=180) == 143, log.read_text()[-2000:]  # bounded: Ray's teardown, under load
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        assert "sr-upscale: interrupted" in log.read_text()
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
