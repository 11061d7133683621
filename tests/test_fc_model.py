"""The fully convolutional VDVAE-SR: any LR size, a stated receptive field, position-keyed
noise, free bits per latent channel, and weight transfer from a fixed-size checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sr_runtime.noise import position_noise
from sr_train.checkpoint import save_checkpoint
from sr_train.model import VDVAESR, SkipUpsampler, preset
from sr_train.train import grow_from, transfer_weights


def shallow_fc(**overrides: object) -> VDVAESR:
    """fc-256's vocabulary with few blocks (a small receptive field keeps the crop test fast),
    every weight non-zero so each conv really reaches as far as the architecture allows."""
    cfg = preset(
        "fc-256",
        width=16,
        custom_width_str="128:8,256:8",
        enc_blocks="256x1,256d2,128x1,128d2,64x1,64d2,32x1,32d2,16x1",
        lr_enc_blocks="64x1,64d2,32x1,32d2,16x1",
        dec_blocks="16x1,32m16,64m32,64x1,128m64,256m128",
        skip_upsampler_width=8,
        num_mixtures=2,
        **overrides,
    )
    torch.manual_seed(0)
    model = VDVAESR(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
        for block in model.decoder.blocks():
            if block.lr_gate is not None:
                block.lr_gate.fill_(1.0)
    return model


def test_fc_preset_takes_any_multiple_of_its_stride():
    model = VDVAESR(preset("fc-256")).eval()
    assert model.config.lr_multiple == 4
    assert not model.decoder.bias_xs  # no fixed-size state anywhere
    with torch.no_grad():
        for h, w in ((16, 16), (20, 36), (44, 28)):
            out = model.sample(torch.rand(2, 3, h, w), None)
            assert out.shape == (2, 3, 4 * h, 4 * w)
            assert torch.isfinite(out).all()


def test_fc_sample_names_the_stride_it_needs():
    model = VDVAESR(preset("fc-256")).eval()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.sample(torch.rand(1, 3, 18, 16), None)


def test_fc_config_rejects_a_global_top():
    with pytest.raises(ValueError, match="1x1"):
        preset("fc-256", lr_enc_blocks="64x1,64d2,32d2,16d4,4d4,1x1")
    with pytest.raises(ValueError, match="must start"):
        preset("fc-256", dec_blocks="8x1,16m8,32m16,64m32,128m64,256m128")


def test_receptive_radius_bounds_the_measured_dependence():
    model = shallow_fc()
    radius = model.receptive_radius()
    side = 2 * radius + 12 - (2 * radius + 12) % 8
    lr = torch.rand(1, 3, side, side, dtype=torch.float64, requires_grad=True)
    acts = model.lr_encoder(model.encoder_input(lr))
    size = lr.shape[2] * 4
    px_z, _ = model.decoder(1, lr, lr_acts=acts, hr_hw=(size, size))
    centre = lr.shape[2] // 2 - lr.shape[2] // 2 % 4
    # All 16 output phases of a 4x4 LR cell: alignment with pooling and upsampling grids varies among them.
    px_z[0, :, 4 * centre : 4 * centre + 16, 4 * centre : 4 * centre + 16].sum().backward()
    assert lr.grad is not None
    rows = lr.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
    reach = max(centre - int(rows.min()), int(rows.max()) - (centre + 3))
    assert reach <= radius  # the bound holds ...
    assert reach >= 0.8 * radius  # ... and is not a loose guess


def test_a_crop_equals_the_whole_image_away_from_its_borders():
    model = shallow_fc()
    radius, step = model.receptive_radius(), model.config.lr_multiple
    gen = torch.Generator().manual_seed(1)
    side = 2 * radius + 8 - (2 * radius + 8) % step
    lr = torch.rand(1, 3, side + 6 * step, side + 10 * step, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        whole = model.sample(lr, None)
        y0, x0 = step * 3, step * 5
        h, w = side, side + step
        crop = model.sample(lr[:, :, y0 : y0 + h, x0 : x0 + w], None)
    inner = 4 * radius
    got = crop[:, :, inner:-inner, inner:-inner]
    want = whole[:, :, 4 * y0 + inner : 4 * (y0 + h) - inner, 4 * x0 + inner : 4 * (x0 + w) - inner]
    assert got.numel() > 0
    assert torch.allclose(got, want, atol=1e-9)
    # Near the crop's border the zero padding differs: the margin is real, not a formality.
    edge = crop[:, :, :4, :4] - whole[:, :, 4 * y0 : 4 * y0 + 4, 4 * x0 : 4 * x0 + 4]
    assert edge.abs().max() > 1e-6


@pytest.mark.parametrize("blocks", [0, 3])
def test_the_skip_upsampler_reaches_as_far_as_it_says(blocks):
    torch.manual_seed(0)
    up = SkipUpsampler(4, 8, 4, blocks).double()
    with torch.no_grad():
        for p in up.parameters():
            p.normal_(0.0, 0.3)
    feats = torch.rand(1, 4, 31, 31, dtype=torch.float64, requires_grad=True)
    up(feats)[0, :, 4 * 15 : 4 * 16, 4 * 15 : 4 * 16].sum().backward()
    assert feats.grad is not None
    rows = feats.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
    assert (15 - int(rows.min()), int(rows.max()) - 15) == (up.reach(), up.reach())


def test_level_noise_is_a_function_of_absolute_position():
    model = shallow_fc()
    whole = model.make_level_noise(2, (32, 48), 0.7, seed=3)
    assert [tuple(t.shape[1:]) for t in whole] == [
        (model.config.zdim * n, 32 * r // 64, 48 * r // 64) for r, n in model.noise_levels
    ]
    assert torch.equal(whole[0][0], whole[0][1])  # every batch row gets the frame's noise
    for level, ((res, count), maps) in enumerate(zip(model.noise_levels, whole, strict=True)):
        f = res / 64
        y0, x0 = int(8 * f), int(12 * f)
        window = position_noise(3, level, model.config.zdim * count, y0, x0, int(16 * f), int(20 * f)) * 0.7
        got = maps[0, :, y0 : y0 + int(16 * f), x0 : x0 + int(20 * f)].numpy()
        np.testing.assert_allclose(got, window, rtol=1e-6)
    other = model.make_level_noise(1, (32, 48), 0.7, seed=4)
    assert not torch.equal(whole[-1][0], other[-1][0])


def test_temperature_changes_the_fc_sample_and_zero_is_deterministic():
    model = shallow_fc()
    lr = torch.rand(1, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        t0 = model.sample_seeded(lr, 0.0, seed=1)
        assert torch.equal(t0, model.sample(lr, None))
        a, b = model.sample_seeded(lr, 0.8, seed=1), model.sample_seeded(lr, 0.8, seed=1)
        c = model.sample_seeded(lr, 0.8, seed=2)
    assert torch.equal(a, b)
    assert (a - t0).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_free_bits_floor_each_latent_channel():
    model = VDVAESR(preset("fc-256", width=16, custom_width_str="", num_mixtures=2))
    hr = torch.rand(2, 3, 64, 96)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    torch.manual_seed(0)
    plain = model(hr, lr)
    torch.manual_seed(0)
    floored = model(hr, lr, free_bits=0.5)
    assert torch.allclose(plain["elbo"], floored["elbo"])  # the reported ELBO is the plain one
    assert torch.equal(plain["rate_objective"], plain["rate"])
    # A fresh model's KL is far below 0.5 nats per channel and position: the floor is what is charged.
    positions = sum(model.config.zdim * h * w for _, h, w in model.latent_shapes_for((64, 96)))
    expected = 0.5 * positions / hr[0].numel()
    assert torch.allclose(floored["rate_objective"], torch.full((2,), expected), rtol=1e-5)
    levels = sum(floored[f"rate/{r}"] for r, _ in model.noise_levels)
    assert torch.allclose(levels, floored["rate"], rtol=1e-5)


def test_transfer_takes_the_encoders_of_a_fixed_size_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = VDVAESR(preset("small-256"))
    with torch.no_grad():
        for p in source.lr_encoder.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "src", source)
    target = VDVAESR(preset("fc-256"))
    transfer_weights(target, str(tmp_path / "src"))
    for key, value in target.lr_encoder.state_dict().items():
        assert torch.equal(value, source.lr_encoder.state_dict()[key]), key
    assert torch.equal(target.skip_upsampler.c1.weight, source.skip_upsampler.c1.weight)


SMALL = {"width": 16, "custom_width_str": "", "num_mixtures": 2, "skip_upsampler_width": 8}


def test_a_grown_model_starts_as_the_checkpoint_it_grew_from(tmp_path):
    torch.manual_seed(0)
    source = VDVAESR(preset("fc-256", posterior_input="residual", **SMALL)).eval()
    with torch.no_grad():
        source.skip_upsampler.c2.weight.normal_(0.0, 0.1)  # a trained upsampler is not zero
    save_checkpoint(tmp_path / "src", source)
    grown = VDVAESR(preset("fc-256-deep", skip_upsampler_blocks=3, **SMALL)).eval()
    grow_from(grown, str(tmp_path / "src"))
    lr = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(grown.sample(lr, None), source.sample(lr, None))
        for block in grown.skip_upsampler.body:  # the added blocks train from here
            block.c2.weight.normal_(0.0, 0.1)
        assert not torch.equal(grown.sample(lr, None), source.sample(lr, None))


def test_growing_refuses_a_checkpoint_it_does_not_extend(tmp_path):
    save_checkpoint(tmp_path / "hr", VDVAESR(preset("fc-256", **SMALL)))
    with pytest.raises(ValueError, match="posterior_input 'hr' -> 'residual'"):
        grow_from(VDVAESR(preset("fc-256-deep", **SMALL)), str(tmp_path / "hr"))
    save_checkpoint(tmp_path / "wide", VDVAESR(preset("fc-256-deep", **{**SMALL, "skip_upsampler_blocks": 4})))
    with pytest.raises(ValueError, match="no place in this preset"):
        grow_from(VDVAESR(preset("fc-256-deep", **{**SMALL, "skip_upsampler_blocks": 2})), str(tmp_path / "wide"))


def test_prior_l1_scores_the_temperature_0_output():
    model = VDVAESR(preset("fc-256", width=16, custom_width_str="", num_mixtures=2)).eval()
    hr = torch.rand(2, 3, 64, 64)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    out = model(hr, lr, prior_l1=True)
    with torch.no_grad():
        t0 = model.sample(lr, None)
    assert torch.allclose(out["prior_l1"], (t0 - hr).abs().mean(dim=(1, 2, 3)), atol=1e-6)
    assert "prior_l1" not in model(hr, lr)


def test_a_scale_cap_makes_a_wide_residual_cost_more():
    from sr_train.model import dmol_nll

    torch.manual_seed(0)
    logits = torch.zeros(1, 2 * 10, 8, 8)  # 2 mixtures, log-scale 0: the whole range is "noise"
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    free = dmol_nll(x, logits, 2)
    capped = dmol_nll(x, logits, 2, max_log_scale=-4.5)
    assert capped.item() > free.item() + 1.0
    assert torch.equal(dmol_nll(x, logits, 2, max_log_scale=0.5), free)  # a cap above every scale changes nothing
