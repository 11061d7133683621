"""The benchmark harness: its statistics, and the --quick CPU run end to end (structure, never speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import latency
from benchmarks.timing import measure_interleaved, summarize


def test_summarize_percentiles_in_milliseconds() -> None:
    s = summarize([0.001 * k for k in range(1, 101)])  # 1..100 ms
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((1.0, 100.0))
    with pytest.raises(ValueError):
        summarize([])


def test_measure_interleaved_round_robin_rotates_and_stops_at_iters() -> None:
    order: list[str] = []
    calls = [(lambda name=name: order.append(name), lambda call: (call(), 0.5)[1]) for name in "abc"]
    samples, cpu = measure_interleaved(calls, iters=3, budget_s=1e9)
    assert samples == [[0.5] * 3] * 3
    assert [len(c) for c in cpu] == [3, 3, 3] and all(x >= 0 for c in cpu for x in c)
    assert order == list("abcbcacab")  # who goes first rotates each round


def test_measure_interleaved_budget_keeps_at_least_two_samples() -> None:
    calls = [(lambda: None, lambda call: 1.0)] * 2
    assert [len(s) for s in measure_interleaved(calls, iters=50, budget_s=0.0)[0]] == [2, 2]
    assert [len(s) for s in measure_interleaved(calls, iters=1, budget_s=0.0)[0]] == [1, 1]
    with pytest.raises(ValueError):
        measure_interleaved(calls, iters=0, budget_s=1.0)


def test_speedups_are_relative_to_pytorch_fp32_on_the_same_device_and_batch() -> None:
    def row(backend: str, precision: str, device: str, batch: int, p50: float) -> dict[str, Any]:
        return {
            "model": "m",
            "backend": backend,
            "precision": precision,
            "device_type": device,
            "batch": batch,
            "latency": {"p50_ms": p50},
        }

    rows = [
        row("pytorch-eager", "fp32", "cpu", 1, 30.0),
        row("onnxruntime-cpu", "fp32", "cpu", 1, 10.0),
        row("onnxruntime-cpu", "fp32", "cpu", 4, 20.0),
        row("tensorrt", "fp16", "cuda", 1, 1.0),
    ]
    latency.add_speedups(rows)
    assert [r["speedup_vs_pytorch_fp32"] for r in rows] == [1.0, 3.0, None, None]


def test_whole_image_sizes_are_a_comma_list() -> None:
    args = latency.resolve(latency.build_parser().parse_args(["--image", "640x480,960x540"]))
    assert args.image == [(640, 480), (960, 540)]
    assert latency.resolve(latency.build_parser().parse_args([])).image == [(640, 480)]
    with pytest.raises(SystemExit):
        latency.build_parser().parse_args(["--image", "640x480,960"])


def test_skipped_entries_merge_per_backend_and_reason() -> None:
    skipped = [
        {"backend": "tensorrt fp16 (cuda)", "what": "tile batch 1", "reason": "no GPU"},
        {"backend": "tensorrt fp16 (cuda)", "what": "tile batch 4", "reason": "no GPU"},
        {"backend": "onnxruntime-cpu fp16 (cpu)", "what": "tile batch 1", "reason": "no fp16 ONNX"},
    ]
    assert latency.merge_skipped(skipped) == [
        {"backend": "tensorrt fp16 (cuda)", "what": "tile batch 1, tile batch 4", "reason": "no GPU"},
        {"backend": "onnxruntime-cpu fp16 (cpu)", "what": "tile batch 1", "reason": "no fp16 ONNX"},
    ]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One --quick run (tiny model exported into a fresh cache), shared by the structure tests."""
    root = tmp_path_factory.mktemp("bench")
    assert latency.main(["--quick", "--out", str(root / "out"), "--cache", str(root / "cache")]) == 0
    jsons = sorted((root / "out").glob("*.json"))
    mds = sorted((root / "out").glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1
    assert jsons[0].stem == mds[0].stem and jsons[0].stem.startswith("cpu-tiny-64-random-quick-")
    return json.loads(jsons[0].read_text()), mds[0].read_text()


def _positive_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_names_device_versions_and_peak(quick_result: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_result
    assert result["schema"] == latency.SCHEMA and result["mode"] == "quick"
    assert result["host"]["cpu"] and result["host"]["usable_cpus"] >= 1
    assert result["versions"]["torch"] and result["versions"]["onnxruntime"]
    assert _positive_finite(result["peaks"]["cpu fp32"]["gflops"])
    model = result["model"]
    assert model["config"] == "tiny-64" and model["trained"] is False and "random" in model["weights"]
    assert _positive_finite(model["gmac_per_tile"])
    assert model["parity_vs_pytorch"]["fraction_over_1e-3"] <= 0.01


def test_quick_run_tile_rows(quick_result: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_result
    tiles = [r for r in result["rows"] if r["kind"] == "tile"]
    ran = {(r["backend"], r["precision"], r["batch"]) for r in tiles}
    assert {("pytorch-eager", "fp32", 1), ("onnxruntime-cpu", "fp32", 1), ("onnxruntime-cpu", "fp32", 2)} <= ran
    for r in tiles:
        lat = r["latency"]
        assert lat["n"] >= 2
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms"):
            assert _positive_finite(lat[key]), (r["backend"], key)
        assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert _positive_finite(r["cpu_time"]["p50_ms"]) and r["cpu_time"]["n"] == lat["n"]
        for key in ("per_tile_p50_ms", "throughput_mpix_s", "gflops", "peak_fraction", "speedup_vs_pytorch_fp32"):
            assert _positive_finite(r[key]), (r["backend"], key)
        assert _positive_finite(r["memory"]["peak_rss_mb"]) and r["memory"]["added_rss_mb"] >= 0
        assert r["device"] == result["host"]["cpu"] and r["resolution"] == "16x16->64x64"
    reference = [r for r in tiles if r["backend"] == "pytorch-eager"]
    assert all(r["speedup_vs_pytorch_fp32"] == 1.0 for r in reference)


def test_quick_run_whole_image_rows(quick_result: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_result
    images = [r for r in result["rows"] if r["kind"] == "image"]
    assert {r["batch"] for r in images if r["backend"] == "onnxruntime-cpu"} == {2}  # the largest tile batch
    for r in images:
        assert r["resolution"] == "64x48->256x192"
        assert r["tiles"] > 1
        assert _positive_finite(r["load_s"]) and _positive_finite(r["first_call_ms"])
        assert _positive_finite(r["latency"]["p50_ms"]) and _positive_finite(r["throughput_mpix_s"])
        assert 0.0 < r["backend_share"] <= 1.0
        assert r["outside_backend_share"] == pytest.approx(1.0 - r["backend_share"])


def test_quick_run_lists_what_it_could_not_measure(quick_result: tuple[dict[str, Any], str]) -> None:
    result, markdown = quick_result
    skipped = {s["backend"] for s in result["skipped"]}
    # no fp16 graph in --quick, no TensorRT on this CPU machine: each said, not silently dropped
    assert "onnxruntime-cpu fp16 (cpu)" in skipped
    assert all(s["reason"] for s in result["skipped"])
    assert "| pytorch-eager | fp32 | 1 |" in markdown and "## Not measured" in markdown


def test_results_directory_holds_only_pairs() -> None:
    """Committed results come as JSON + markdown of the same name, and every JSON parses."""
    results = Path(latency.RESULTS_DIR)
    for path in results.glob("*.json"):
        assert path.with_suffix(".md").is_file(), path
        json.loads(path.read_text())


def test_quality_bicubic_row_matches_the_protocols_bicubic(tmp_path: Path) -> None:
    """Two bundled photos: the table carries bicubic (timed) and names what it skipped, with a reason."""
    from benchmarks import quality

    assert (
        quality.main(
            [
                "--images",
                str(tmp_path / "none"),
                "--limit",
                "2",
                "--model-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (path,) = (tmp_path / "out").glob("quality-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["schema"] == quality.SCHEMA and result["n_images"] == 2
    assert result["images"].startswith("scikit-image")
    bic = result["methods"][0]
    assert bic["method"] == "bicubic (Pillow)" and bic["temperature"] is None
    assert bic["psnr_y"] == pytest.approx(result["bicubic"]["psnr_y"]) and bic["delta_psnr_vs_bicubic"] == 0.0
    assert 15.0 < bic["psnr_y"] < 50.0 and 0.0 < bic["ssim_y"] <= 1.0
    assert any(s["method"] == "VDVAE-SR" for s in result["skipped"])  # no trained model in tmp_path
    for r in result["methods"]:
        assert _positive_finite(r["seconds_per_image"]) and len(r["per_image"]) == 2
    assert path.with_suffix(".md").read_text().count("| bicubic (Pillow) |") == 1


def test_srmd_from_its_wheel_beats_bicubic_on_a_photo() -> None:
    """The pretrained reference really super-resolves (offline, CPU): a clear gain over bicubic."""
    from benchmarks.pretrained import PretrainedUnavailable, SrmdNcnn
    from sr_train.degrade import upscale_bicubic_x4
    from sr_train.evaluate import prepare_eval_pair
    from sr_train.metrics import psnr_y

    try:
        srmd = SrmdNcnn(threads=1)
    except PretrainedUnavailable as exc:
        pytest.skip(f"optional pretrained model absent: {exc}")
    from skimage import data

    hr, lr = prepare_eval_pair(np.asarray(data.astronaut()), 128)
    sr = srmd.upscale(lr)
    assert sr.shape == hr.shape and sr.dtype == np.uint8
    assert psnr_y(hr, sr) > psnr_y(hr, upscale_bicubic_x4(lr)) + 1.0


def test_cnn_baseline_trains_scores_and_writes_json_and_markdown(tmp_path: Path) -> None:
    """A few seconds of the plain-CNN yardstick on real photos: it runs, stays near bicubic, writes both files."""
    from PIL import Image
    from skimage import data

    from benchmarks import cnn_baseline

    for split, names in (("train", ("astronaut", "coffee")), ("val", ("chelsea",))):
        (tmp_path / split).mkdir()
        for name in names:
            Image.fromarray(getattr(data, name)()[..., :3]).save(tmp_path / split / f"{name}.png")
    out = tmp_path / "cnn.json"
    assert (
        cnn_baseline.main(
            [
                "--data",
                str(tmp_path / "train"),
                "--val",
                str(tmp_path / "val"),
                "--minutes",
                "0.05",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["steps"] >= 1 and abs(result["delta_psnr_y"]) < 1.0  # zero-init head: starts at bicubic
    assert f"{result['psnr_y']:.2f}" in out.with_suffix(".md").read_text()


def test_cpu_batch_picks_the_leanest_batch_within_five_percent_of_the_fastest_round_by_round() -> None:
    from benchmarks.cpu_batch import leanest_as_fast, paired_ratios

    def row(batch: int, wall: list[float], peak: float) -> dict[str, Any]:
        return {"batch": batch, "wall_s": wall, "wall_p50_s": float(np.median(wall)), "memory": {"peak_rss_mb": peak}}

    # Round 2 was slow for everyone (a load spike): paired by round, batch 1 is 3% behind batch 16.
    rows = [row(1, [10.3, 30.9, 10.3], 200), row(4, [10.5, 31.5, 10.6], 500), row(16, [10.0, 30.0, 10.0], 1900)]
    paired_ratios(rows)
    assert [round(r["vs_fastest"], 3) for r in rows] == [1.03, 1.05, 1.0]
    assert leanest_as_fast(rows) == 1
    rows[0] = row(1, [10.6, 31.8, 10.7], 200)  # 6% behind in every round: out
    paired_ratios(rows)
    assert leanest_as_fast(rows) == 4
    # The lowest median is not the fastest round by round: batch 8 wins every round but the spiked one.
    rows = [row(4, [10.0, 10.0, 10.0], 500), row(8, [9.4, 30.0, 9.4], 900)]
    paired_ratios(rows)
    assert [round(r["vs_fastest"], 3) for r in rows] == [1.064, 1.0]
    assert leanest_as_fast(rows) == 8
