"""sr-upscale over many files: the next file decodes and the previous one is written while the
backend works (`sr_runtime.jobs.run_files`), with every option and error exactly as one file at a time."""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image, ImageCms

from sr_runtime import Upscaler
from sr_runtime.cli import main
from sr_runtime.jobs import FileOutcome, UpscaleOptions, run_files
from sr_runtime.model import default_model_dir

#: Per-file report fields that are measurements, not results.
TIMING_FIELDS = ("seconds", "backend_seconds", "stage_seconds")


def icc_profile() -> bytes:
    """An RGB ICC profile whose bytes differ from Pillow's own sRGB (as a Display P3 file's would)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:100] + b"wide-gamut-stand-in" + profile[119:]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Real photo crops of several kinds: RGB with an ICC profile, RGBA, grey, 16-bit grey; a broken file between."""
    src = tmp_path / "in"
    src.mkdir()
    base = Image.fromarray(photo_lr(64))
    profile = icc_profile()
    base.crop((0, 0, 30, 22)).save(src / "a.png", icc_profile=profile)
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rgba = base.crop((10, 5, 34, 29)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(src / "c.png")
    base.crop((20, 20, 46, 40)).save(src / "d.jpg", quality=90, icc_profile=profile)
    Image.fromarray(np.asarray(base.convert("L"), np.uint16)[:18, :21] * 257).save(src / "e.png")
    base.crop((3, 30, 27, 50)).convert("L").save(src / "f.webp")
    return src


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def results(report: Path) -> list[dict[str, object]]:
    """A --report's per-file entries without the timing fields, and with the outputs' folders dropped."""
    entries = json.loads(report.read_text())["files"]
    out = []
    for entry in entries:
        kept = {k: v for k, v in entry.items() if k not in TIMING_FIELDS}
        kept["output"] = Path(str(kept["output"])).name
        out.append(kept)
    return out


OPTION_SETS = {
    "defaults": [],
    "samples-std-map-outscale": ["--temperature", "0.5", "--samples", "3", "--std-map", "--outscale", "2.5"],
    "webp-seed-suffix-timings": ["-f", "webp", "--temperature", "0.3", "--seed", "7", "--suffix", "_big", "--timings"],
    "jpeg-outscale-below-1": ["-f", "jpg", "--outscale", "0.5"],
}


@pytest.mark.parametrize("flags", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_a_folder_run_writes_byte_for_byte_what_one_file_at_a_time_writes(
    double_model: Path, folder: Path, tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(double_model), "--backend", "cpu", "-q", *flags]
    together, apart = tmp_path / "together", tmp_path / "apart"
    assert main([str(folder), "-o", str(together), "--report", str(tmp_path / "together.json"), *common]) == 1
    together_err = capsys.readouterr().err
    one_by_one: list[dict[str, object]] = []
    for k, src in enumerate(sorted(folder.iterdir())):
        report = tmp_path / f"apart-{k}.json"
        assert main([str(src), "-o", str(apart), "--report", str(report), *common]) == (1 if src.name == "b.png" else 0)
        one_by_one += results(report)
    assert files_of(together) == files_of(apart)
    assert len(files_of(together)) == (10 if "--std-map" in flags else 5)
    assert results(tmp_path / "together.json") == one_by_one
    # The broken file in the middle fails alone, on its own line, and the others are all done.
    failed = [line for line in together_err.splitlines() if "failed:" in line]
    assert len(failed) == 1 and failed[0].startswith(f"sr-upscale: failed: {folder / 'b.png'}: ")
    assert "5 done, 1 failed" in together_err
    if "--timings" in flags:  # one line per done file, in input order
        timed = [line.split(" -> ")[0] for line in together_err.splitlines() if " s wall, backend " in line]
        assert timed == [f"sr-upscale: {folder / n}" for n in ("a.png", "c.png", "d.jpg", "e.png", "f.webp")]


def test_icc_profiles_survive_the_folder_run(double_model: Path, folder: Path, tmp_path: Path) -> None:
    assert main([str(folder), "-o", str(tmp_path / "out"), "--model", str(double_model), "-q"]) == 1
    for name in ("a.png", "d.jpg"):
        with Image.open(folder / name) as src, Image.open(tmp_path / "out" / name.replace(".", "_x4.")) as out:
            assert src.info["icc_profile"] and out.info.get("icc_profile") == src.info["icc_profile"]


def test_no_clobber_and_checks_judge_each_file_as_one_at_a_time_would(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """a.png and a.webp share a_x4.png under -f png: the second waits for the first, then is skipped
    (--no-clobber: it exists now) or refused (claimed); errors at the checks and at the write stay per file."""
    src = tmp_path / "in"
    src.mkdir()
    for name, size in (("a.png", 12), ("a.webp", 14), ("b.png", 10), ("c.png", 16), ("d.png", 11)):
        Image.fromarray(photo_lr(size)).save(src / name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_x4.png").write_bytes(b"an old result")
    (out / "c_x4.png").mkdir()  # a folder where c's output goes
    report = tmp_path / "r.json"
    args = ["--model", str(double_model), "-q", "-f", "png", "-o", str(out), "--report", str(report)]
    files = [str(src / n) for n in ("a.png", "a.webp", "b.png", "c.png", "d.png")]

    def statuses() -> list[tuple[str, object]]:
        return [(Path(str(f["input"])).name, f["status"]) for f in json.loads(report.read_text())["files"]]

    assert main([*files, "--no-clobber", *args]) == 0
    assert statuses() == [
        ("a.png", "done"),
        ("a.webp", "skipped"),
        ("b.png", "skipped"),
        ("c.png", "skipped"),
        ("d.png", "done"),
    ]
    assert (out / "b_x4.png").read_bytes() == b"an old result"
    capsys.readouterr()
    assert main([*files, *args]) == 1
    assert statuses() == [
        ("a.png", "done"),
        ("a.webp", "failed"),
        ("b.png", "done"),
        ("c.png", "failed"),
        ("d.png", "done"),
    ]
    err = capsys.readouterr().err
    assert f"{src / 'a.webp'}: output {out / 'a_x4.png'} was already written for another input" in err
    assert f"failed: {src / 'c.png'}: " in err
    with Upscaler(double_model, backend="cpu") as up:
        for name in ("a", "b", "d"):
            expected = np.asarray(up.run(Image.open(src / f"{name}.png")))
            assert np.array_equal(np.asarray(Image.open(out / f"{name}_x4.png")), expected)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(("interrupt", "status"), [(KeyboardInterrupt(), 130), (SystemExit(143), 143)])
def test_an_interrupt_finishes_the_file_being_written_and_writes_nothing_after(
    double_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: BaseException,
    status: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C (or SIGTERM) during b's upscale while a is still being written: a is finished and reported
    done, b and c (decoded ahead) write nothing, no temporary file is left."""
    from sr_runtime import jobs

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(photo_lr(16)).save(src / f"{name}.png")
    real_save, real_upscale = jobs.save_atomic, jobs.upscale_input

    def slow_save(img: Image.Image, dest: Path, icc: bytes | None = None) -> None:
        time.sleep(0.5)  # still writing when b's upscale is interrupted
        real_save(img, dest, icc)

    def interrupted_at_b(up: Upscaler, path: Path, decoded: jobs.DecodedInput, options: UpscaleOptions) -> object:
        if path.name == "b.png":
            raise interrupt
        return real_upscale(up, path, decoded, options)

    monkeypatch.setattr(jobs, "save_atomic", slow_save)
    monkeypatch.setattr(jobs, "upscale_input", interrupted_at_b)
    out, report = tmp_path / "out", tmp_path / "r.json"
    rc = main([str(src), "-o", str(out), "--model", str(double_model), "-q", "--report", str(report)])
    assert rc == status
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png"]
    with Upscaler(double_model, backend="cpu") as up:
        assert np.array_equal(np.asarray(Image.open(out / "a_x4.png")), np.asarray(up.run(Image.open(src / "a.png"))))
    data = json.loads(report.read_text())
    assert [(Path(str(f["input"])).name, f["status"]) for f in data["files"]] == [("a.png", "done")]
    assert data["exit_status"] == status and "1 done, 0 failed" in capsys.readouterr().err


def test_run_files_reports_in_input_order_whatever_fails(double_model: Path, tmp_path: Path) -> None:
    sources = []
    for k in range(5):
        path = tmp_path / f"{k}.png"
        if k in (1, 3):
            path.write_bytes(b"")
        else:
            Image.fromarray(photo_lr(10 + k)).save(path)
        sources.append(path)
    options = UpscaleOptions(output=str(tmp_path / "out"), quiet=True)
    seen: list[FileOutcome] = []
    with Upscaler(double_model, backend="cpu") as up:
        run_files(up, sources, options, seen.append)
    assert [o.src for o in seen] == sources
    assert [o.status for o in seen] == ["done", "failed", "done", "failed", "done"]
    assert all(o.failure is not None and "empty file" in o.failure for o in seen if o.status == "failed")


@pytest.mark.parametrize("how", ["overlap", "one-at-a-time", "run_file"])
def test_after_a_large_file_memory_goes_back_once_nothing_holds_its_images(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """malloc_trim (`release_free_memory`) runs once per large file, after its write, when its x4
    image is already freed: in run_files with and without overlap, and in run_file (Ray workers)."""
    from sr_runtime import jobs

    sources = []
    for k, side in enumerate((12, 40, 16)):  # 48x48, 160x160 and 64x64 out: only the second is large here
        path = tmp_path / f"{k}.png"
        Image.fromarray(photo_lr(side)).save(path)
        sources.append(path)
    monkeypatch.setattr(jobs, "LARGE_OUTPUT_PIXELS", 100 * 100)
    images: list[tuple[str, weakref.ref[Image.Image]]] = []
    real_upscale = jobs.upscale_input

    def recording(up: Upscaler, path: Path, decoded: jobs.DecodedInput, options: UpscaleOptions) -> object:
        done = real_upscale(up, path, decoded, options)
        images.append((path.name, weakref.ref(done.image)))
        return done

    released: list[list[str]] = []  # per release: the files whose x4 image was still alive

    def release() -> bool:
        released.append([name for name, ref in images if ref() is not None])
        return True

    monkeypatch.setattr(jobs, "upscale_input", recording)
    monkeypatch.setattr(jobs, "release_free_memory", release)
    options = UpscaleOptions(output=str(tmp_path / "out"), quiet=True)
    with Upscaler(double_model, backend="cpu") as up:
        if how == "run_file":
            for src in sources:
                dest = jobs.output_path(src, options)
                assert jobs.run_file(up, src, jobs.output_targets(dest, options), options).notes is not None
        else:
            seen: list[FileOutcome] = []
            run_files(up, sources, options, seen.append, overlap=how == "overlap")
            assert [o.status for o in seen] == ["done"] * 3
    assert len(released) == 1 and "1.png" not in released[0]


@pytest.mark.slow
def test_the_next_file_decodes_and_the_last_is_written_while_the_real_backend_runs(tmp_path: Path) -> None:
    """With the shipped model on real photo crops, from each file's stage times: file i+1's read starts
    before file i's upscale ends, and file i's write ends after file i+1's upscale has begun; without
    overlap neither happens (the same check fails)."""
    src = tmp_path / "in"
    src.mkdir()
    sources = []
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        path = src / f"{k}.png"
        Image.fromarray(photo_lr(60, name)).save(path)  # one 64x64 tile each
        sources.append(path)
    # --outscale 16: a 960x960 Lanczos resize and PNG encode, so a write takes long enough to be seen.
    options = UpscaleOptions(output=str(tmp_path / "out"), outscale=16.0, quiet=True)
    with Upscaler(default_model_dir(), backend="cpu") as up:
        overlapped: list[FileOutcome] = []
        run_files(up, sources, options, overlapped.append)
        one_at_a_time: list[FileOutcome] = []
        run_files(up, sources, options, one_at_a_time.append, overlap=False)

    def stages(outcomes: list[FileOutcome]) -> list:
        assert [o.status for o in outcomes] == ["done"] * 3
        return [o.notes.stages for o in outcomes if o.notes is not None]

    def overlaps(times: list) -> tuple[bool, bool]:
        read_ahead = all(times[i + 1].read[0] < times[i].upscale[1] for i in range(2))
        write_behind = all(times[i].write[1] > times[i + 1].upscale[0] for i in range(2))
        return read_ahead, write_behind

    assert overlaps(stages(overlapped)) == (True, True)
    assert overlaps(stages(one_at_a_time)) == (False, False)
