"""Our HR encoder + decoder reproduce the official VDVAE implementation's outputs.

The fixture directory comes from VDVAE_REFERENCE_DIR (default:
tests/fixtures/vdvae_reference). A missing fixture FAILS: this test is the
proof of fidelity.
"""

from __future__ import annotations

import pytest
import torch

from sr_train.model import VDVAESR, dmol_nll
from sr_train.vdvae_import import VDVAEImportError, import_vdvae_weights, load_vdvae_state_dict
from sr_train.vdvae_reference import load_reference, reference_dir, reference_pairs

EXPECTED_GROUPS = {
    "encoder_activation_",
    "posterior_mean_z_block",
    "posterior_mean_kl_block",
    "posterior_mean_px_z",
    "posterior_mean_dmol_logits",
    "posterior_mean_distortion_per_pixel",
    "posterior_mean_rate_per_pixel",
    "posterior_mean_elbo",
    "prior_px_z",
    "prior_dmol_logits",
    "manual_dmol_logits",
}


@pytest.fixture(scope="module")
def root():
    path = reference_dir()
    if not path.is_dir():
        pytest.fail(f"VDVAE reference fixture not found at {path} (set VDVAE_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="module")
def pairs(root):
    return reference_pairs(root)


def test_every_fixture_output_is_compared(pairs):
    for group in EXPECTED_GROUPS:
        assert any(name.startswith(group) for name in pairs), group


def test_every_output_matches_official(pairs):
    for name, (ours, official) in pairs.items():
        assert ours.shape == official.shape, name
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_distortion_depends_on_the_target(root):
    """A loss that ignored its input would still 'match' at eps = 0: a shifted target must cost differently."""
    _, expected, model = load_reference(root)
    x = expected["x_uint8"].permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    logits = expected["posterior_mean_dmol_logits"].permute(0, 3, 1, 2)
    base = dmol_nll(x, logits, model.config.num_mixtures)
    shifted = dmol_nll(x.roll(3, dims=-1), logits, model.config.num_mixtures)
    assert (shifted - base).abs().min() > 1e-4


def test_import_lists_missing_unexpected_and_misshaped_keys(root):
    _, _, model = load_reference(root)
    bad = load_vdvae_state_dict(root / "vdvae-ref-model.th")
    bad["decoder.something_new"] = torch.zeros(1)
    del bad["decoder.gain"]
    bad["encoder.in_conv.bias"] = torch.zeros(7)
    with pytest.raises(VDVAEImportError) as err:
        import_vdvae_weights(model, bad)
    msg = str(err.value)
    assert "decoder.something_new" in msg and "decoder.gain" in msg and "hr_encoder.in_conv.bias" in msg


def test_import_leaves_only_sr_additions_untouched(root):
    _, _, model = load_reference(root)
    fresh = VDVAESR(model.config)
    untouched = import_vdvae_weights(fresh, root / "vdvae-ref-model.th")
    assert untouched and all(k.startswith("lr_encoder.") or k.endswith(".lr_gate") for k in untouched)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        if name not in untouched:
            assert torch.equal(a, b), name
