"""The VDVAE-SR model: presets, shapes, losses, the sampling path and its noise contract."""

from __future__ import annotations

import pytest
import torch

from sr_train.info import model_info
from sr_train.model import (
    VDVAESR,
    VDVAESRConfig,
    dmol_mean,
    dmol_mode,
    dmol_sample,
    parse_layer_string,
    preset,
)


def tiny(name: str) -> VDVAESRConfig:
    """The same layer strings as the named preset at width 16 (for speed)."""
    return preset(name, width=16, custom_width_str="", zdim=4, num_mixtures=2)


def test_parse_layer_string_matches_vdvae_vocabulary():
    assert parse_layer_string("1x2,4m1,8d2,16") == [(1, None), (1, None), (4, 1), (8, 2), (16, None)]


@pytest.mark.parametrize(
    "name, hr, lr, params, gmac",
    [
        # Counted by sr_train.info from the real modules (meta device); guards accidental architecture changes.
        ("paper-64", 64, 16, 137_383_972, 79.98),
        ("paper-256", 256, 64, 141_353_828, 276.40),
    ],
)
def test_full_paper_presets_build_with_expected_size(name, hr, lr, params, gmac):
    cfg = preset(name)
    assert (cfg.hr_size, cfg.lr_size, cfg.width, cfg.zdim, cfg.num_mixtures) == (hr, lr, 512, 16, 10)
    info = model_info(cfg)
    assert info.params["total"] == params
    assert info.gmac_per_tile == pytest.approx(gmac, abs=0.01)
    with torch.device("meta"):
        model = VDVAESR(cfg)
    # every decoder block at a resolution the LR encoder provides (other than 1) carries a zero gate
    gated = {b.res for b in model.decoder.dec_blocks if b.lr_gate is not None}
    assert gated == set(model.lr_resolutions) - {1}


def test_thesis_variant_injects_only_below_32():
    with torch.device("meta"):
        model = VDVAESR(preset("paper-256-thesis"))
    assert {b.res for b in model.decoder.dec_blocks if b.lr_gate is not None} == {4, 8, 16}


def test_config_rejects_inconsistent_layer_strings():
    with pytest.raises(ValueError, match="width may not grow"):
        preset("small-256", custom_width_str="128:96")
    with pytest.raises(ValueError, match="encoder block at"):
        preset("small-256", lr_enc_blocks="64x2,32x1")
    with pytest.raises(ValueError, match="hr_size"):
        preset("small-256", lr_size=32)


@pytest.mark.parametrize("name", ["paper-64", "paper-256", "small-256"])
def test_training_forward_and_sampling_on_scaled_down_preset(name):
    torch.manual_seed(0)
    cfg = tiny(name)
    model = VDVAESR(cfg)
    hr = torch.randint(0, 256, (1, 3, cfg.hr_size, cfg.hr_size)).float() / 255
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    out = model(hr, lr)
    levels = {f"rate/{r}" for r, _ in parse_layer_string(cfg.dec_blocks)}
    assert set(out) == {"elbo", "distortion", "rate", "rate_objective", *levels} and out["elbo"].shape == (1,)
    assert torch.allclose(sum(out[k] for k in levels), out["rate"])
    assert torch.equal(out["rate_objective"], out["rate"])  # no free bits: the plain ELBO
    assert torch.allclose(out["elbo"], out["distortion"] + out["rate"])
    out["elbo"].mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("decoder.bias_xs.1"))
    with torch.no_grad():
        sr = model.sample(lr, torch.zeros(1, model.noise_dim))
    assert sr.shape == (1, 3, cfg.hr_size, cfg.hr_size) and sr.min() >= 0 and sr.max() <= 1


def test_gates_start_at_zero_so_lr_enters_only_through_the_top():
    """With zero gates, LR pixels reach the decoder only via p(z0|y) at 1x1 (thesis 5.7.2)."""
    cfg = tiny("small-256")
    model = VDVAESR(cfg)
    assert all(float(b.lr_gate.detach().abs().sum()) == 0 for b in model.decoder.dec_blocks if b.lr_gate is not None)


def test_noise_drives_the_sample_and_zero_noise_is_deterministic():
    torch.manual_seed(0)
    cfg = tiny("small-256")
    model = VDVAESR(cfg).eval()
    for p in model.parameters():  # leave zero-init behind so the prior actually varies
        p.data += 0.05 * torch.randn_like(p)
    lr = torch.rand(2, 3, cfg.lr_size, cfg.lr_size)
    with torch.no_grad():
        a = model.sample(lr, torch.zeros(2, model.noise_dim))
        b = model.sample(lr, torch.zeros(2, model.noise_dim))
        c = model.sample_seeded(lr, temperature=0.8, seed=1)
        d = model.sample_seeded(lr, temperature=0.8, seed=1)
        e = model.sample_seeded(lr, temperature=0.8, seed=2)
    assert torch.equal(a, b) and torch.equal(c, d)
    # noise moves pixels by whole grey levels, not by rounding error
    assert (c - e).abs().max() > 1 / 255 and (a - c).abs().max() > 1 / 255
    assert model.noise_dim == sum(cfg.zdim * r * r for r, _ in parse_layer_string(cfg.dec_blocks))


def test_unpack_noise_is_decoder_block_order():
    cfg = tiny("small-256")
    model = VDVAESR(cfg)
    noise = torch.arange(model.noise_dim, dtype=torch.float32).repeat(2, 1)
    parts = model.unpack_noise(noise)
    assert [tuple(p.shape[1:]) for p in parts] == model.latent_shapes
    assert torch.equal(torch.cat([p.flatten(1) for p in parts], 1), noise)


def test_stochastic_head_samples_differ_and_stay_in_range():
    cfg = tiny("small-256")
    model = VDVAESR(cfg).eval()
    lr = torch.rand(1, 3, cfg.lr_size, cfg.lr_size)
    noise = torch.zeros(1, model.noise_dim)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x1 = model.sample(lr, noise, stochastic_head=True, generator=g)
        x2 = model.sample(lr, noise, stochastic_head=True, generator=g)
    assert (x1 - x2).abs().mean() > 1 / 255 and x1.min() >= 0 and x1.max() <= 1


def test_lr_skip_starts_near_the_bicubic_image():
    """small-256 models the residual over bicubic; at init its mode is the bicubic image to < 1 grey level."""
    torch.manual_seed(0)
    cfg = tiny("small-256")
    model = VDVAESR(cfg).eval()
    lr = torch.rand(1, 3, cfg.lr_size, cfg.lr_size)
    with torch.no_grad():
        sr = model.sample(lr, torch.zeros(1, model.noise_dim))
    up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert (sr - up).abs().max() < 1 / 255


def test_mixture_components_start_distinct_and_stay_distinct_after_a_step():
    """Identical components get identical gradients forever: the init must break the symmetry."""
    torch.manual_seed(0)
    cfg = tiny("small-256")
    model = VDVAESR(cfg)
    m = cfg.num_mixtures
    hr = torch.rand(1, 3, cfg.hr_size, cfg.hr_size)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(hr, lr)["elbo"].mean().backward()
    opt.step()
    w = model.decoder.out_conv.weight.detach().flatten(1)
    per_component = [w[m:].view(3, 3, m, -1)[:, :, k] for k in range(m)]  # means, scales, coeffs of component k
    # distinct by far more than rounding: the init's spread (std 1e-3) survives the step
    assert (per_component[0] - per_component[1]).abs().max() > 1e-4
    assert (w[0] - w[1]).abs().max() > 1e-4  # mixture logits


def test_mixture_mean_head_is_the_expected_value_of_the_sampler():
    """dmol_mean must equal the average of many stochastic-head samples (means kept off the clip)."""
    torch.manual_seed(0)
    m, n = 3, 20000
    logits = torch.randn(1, 10 * m, 2, 2) * 0.5
    params = logits[:, m:].view(1, 3, 3 * m, 2, 2)
    params[:, :, :m] *= 0.4  # means and scales e^-3 keep every sample inside [-1, 1]: no clipping
    params[:, :, m : 2 * m] = -3.0
    g = torch.Generator().manual_seed(1)
    samples = dmol_sample(logits.expand(n, -1, -1, -1), m, generator=g)
    expected = dmol_mean(logits, m)
    assert (samples.mean(0, keepdim=True) - expected).abs().max() < 0.01
    # and it is not the mode: the most likely component's mean differs from the average here
    assert (dmol_mode(logits, m) - expected).abs().max() > 0.05


def test_head_statistic_selects_the_deterministic_output():
    torch.manual_seed(0)
    lr = torch.rand(1, 3, 64, 64)
    outs = {}
    for stat in ("mode", "mean"):
        torch.manual_seed(0)
        model = VDVAESR(
            tiny("small-256")
            if stat == "mean"
            else preset("small-256", width=16, custom_width_str="", zdim=4, num_mixtures=2, head_statistic="mode")
        )
        model.decoder.out_conv.weight.data.normal_(std=0.3)  # components far apart
        with torch.no_grad():
            outs[stat] = model.sample(lr, torch.zeros(1, model.noise_dim))
    assert (outs["mode"] - outs["mean"]).abs().max() > 1 / 255
    with pytest.raises(ValueError, match="head_statistic"):
        preset("small-256", head_statistic="median")


def test_skip_upsampler_is_a_learned_residual_over_bicubic():
    """Zero last conv: the skip starts at bicubic; after a few steps on the skip objective it is closer to HR."""
    torch.manual_seed(0)
    cfg = tiny("small-256")
    model = VDVAESR(cfg)
    assert model.skip_upsampler is not None
    hr = torch.nn.functional.interpolate(torch.rand(2, 3, 32, 32), size=cfg.hr_size, mode="bilinear")
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    bicubic = torch.nn.functional.interpolate(lr * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.equal(model.mean_base(lr), bicubic)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    before = model(hr, lr, objective="skip")["loss"].mean().item()
    for _ in range(15):
        opt.zero_grad()
        model(hr, lr, objective="skip")["loss"].mean().backward()
        opt.step()
    after = model(hr, lr, objective="skip")["loss"].mean().item()
    assert after < 0.8 * before, (before, after)
    with pytest.raises(ValueError, match="objective"):
        model(hr, lr, objective="mse")


def test_skip_upsampler_requires_the_lr_skip():
    with pytest.raises(ValueError, match="skip_upsampler_width"):
        preset("small-256", lr_skip=False)
