"""Checkpoints: safetensors + JSON, round trip, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sr_train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from sr_train.model import VDVAESR, preset


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = VDVAESR(preset("small-256", width=16, custom_width_str="", zdim=4, num_mixtures=2)).eval()
    for p in m.parameters():
        p.data += 0.02 * torch.randn_like(p)
    return m


def test_round_trip_gives_identical_outputs(tmp_path, model):
    save_checkpoint(tmp_path / "ck", model, step=7, ema=True)
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 7 and meta["weights"] == "ema"
    assert loaded.config == model.config
    lr = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.sample_seeded(lr, 0.5, 3), loaded.sample_seeded(lr, 0.5, 3))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_config_carries_preprocessing_and_sizes(tmp_path, model):
    save_checkpoint(tmp_path / "ck", model)
    meta = read_checkpoint_meta(tmp_path / "ck")
    for key in ("input_shift", "input_scale", "lr_size", "hr_size"):
        assert meta["model"][key] == getattr(model.config, key)


def test_not_a_checkpoint_is_a_clear_error(tmp_path, model):
    with pytest.raises(CheckpointError, match="not a VDVAE-SR checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path)


def test_corrupted_or_mismatched_weights_are_refused(tmp_path, model):
    save_checkpoint(tmp_path / "ck", model)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "ck")
    other = VDVAESR(preset("small-256", width=8, custom_width_str="", zdim=4, num_mixtures=2))
    save_checkpoint(tmp_path / "other", other)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(
        json.dumps({**meta, "weights_sha256": read_checkpoint_meta(tmp_path / "other")["weights_sha256"]})
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "other")


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, model, monkeypatch):
    save_checkpoint(tmp_path / "ck", model, step=1)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    from sr_runtime import files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)  # the weights' temp file is written, its rename fails
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", model, step=2)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert read_checkpoint_meta(tmp_path / "ck")["step"] == 1
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")] == []


def _with_config(tmp_path, model, **changes):
    save_checkpoint(tmp_path / "ck", model)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"].update(changes)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))  # weights_sha256 still matches
    return tmp_path / "ck"


@pytest.mark.parametrize(
    "changes",
    [{"width": 4096}, {"zdim": 64}, {"dec_blocks": "1x1,4m1,4x3,16m4,16x1,32m16,32x2,64m32,64x5,128m64,128x1,256m128"}],
)
def test_config_sizes_are_checked_against_the_weights_before_building(tmp_path, model, monkeypatch, changes):
    import sr_train.checkpoint as ck

    built_on = []
    real = ck.VDVAESR

    def spy(config):
        built_on.append(torch.empty(0).device.type)
        return real(config)

    monkeypatch.setattr(ck, "VDVAESR", spy)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(_with_config(tmp_path, model, **changes))
    assert built_on and "cpu" not in built_on  # only a shape-only (meta) model was built


def test_negative_config_sizes_are_a_checkpoint_error(tmp_path, model):
    with pytest.raises(CheckpointError):
        load_checkpoint(_with_config(tmp_path, model, width=-4))


def test_weights_sha256_is_mandatory(tmp_path, model):
    ck = _with_config(tmp_path, model)
    meta = json.loads((ck / "config.json").read_text())
    del meta["weights_sha256"]
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no weights_sha256"):
        load_checkpoint(ck)


def test_weights_get_the_usual_permissions(tmp_path, model):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", model)
    finally:
        os.umask(old)
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o644
