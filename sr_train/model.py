"""VDVAE-SR: a very deep hierarchical VAE whose prior is conditioned on the LR image.

One file, read top to bottom: the layer-string vocabulary, the residual block,
the bottom-up encoders (HR and LR), the top-down decoder with LR-gated
conditioning, the discretized mixture of logistics head, and the model that
ties them together. The HR encoder and decoder are VDVAE (Child 2020) module
for module, so released VDVAE weights load into them (see vdvae_import.py);
the LR encoder and the zero-initialised gates are what VDVAE-SR adds
(Chira & Haralampiev 2021).

Tensors are NCHW. Images enter as floats in [0, 1] (multiples of 1/255 for
real 8-bit data) and are mapped to the encoders' input statistics inside the
model, so exported graphs take [0, 1] directly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------
# Configuration and the layer-string vocabulary
# ---------------------------------------------------------------------------

HEAD_STATISTICS = ("mode", "mean")
IMAGENET64_STATS = (-115.92961967, 1.0 / 69.37404)
FFHQ256_STATS = (-112.8666757481, 1.0 / 69.84780273)


@dataclass
class VDVAESRConfig:
    """Hyper-parameters in VDVAE's vocabulary, plus the SR-specific ones.

    Layer strings: ``RxN`` = N blocks at resolution R, ``RmS`` = one block at R
    mixing in the upsampled state from S (decoder), ``RdK`` = a block at R
    followed by KxK average pooling (encoders).
    """

    name: str = "custom"
    hr_size: int = 256
    lr_size: int = 64
    width: int = 512
    custom_width_str: str = ""  # "res:width,..." as in VDVAE
    enc_blocks: str = ""  # HR encoder (posterior only)
    dec_blocks: str = ""
    lr_enc_blocks: str = ""  # LR encoder, top resolution = lr_size
    zdim: int = 16
    bottleneck_multiple: float = 0.25
    num_mixtures: int = 10
    no_bias_above: int = 64
    # Highest decoder resolution that receives gate * lr_activation. None means
    # every resolution the LR encoder provides; the thesis code used 16 (r < 32).
    lr_inject_max_res: int | None = None
    low_bit: bool = False  # VDVAE's 5-bit DMoL loss (FFHQ-256)
    # Project addition for small CPU-trained models: the DMoL means are offsets
    # from the bicubically upsampled LR image, so the decoder models the residual.
    lr_skip: bool = False
    # Fully convolutional (project design): resolutions in the layer strings name
    # scales of the training crop (r / lr_size x the LR image), encoders stop above
    # 1x1, the decoder starts from the LR encoder's coarsest map and latents are maps
    # at every level, so any LR size that is a multiple of ``lr_multiple`` runs.
    fully_convolutional: bool = False
    # Learned x4 upsampling on top of the LR skip (project addition, 0 = bicubic alone):
    # conv3x3 (this width) -> GELU -> conv3x3 -> pixel shuffle over the LR encoder's
    # top activation, added to the bicubic image. Its last conv starts at zero.
    skip_upsampler_width: int = 0
    # Residual blocks (conv3x3 -> GELU -> conv3x3, full width, EDSR-style) between the
    # upsampler's two convs: the deterministic capacity at the LR resolution, where a
    # 3x3 conv costs 1/16 of one at the output's. Each block's last conv starts at zero,
    # so blocks added to a trained model leave its output unchanged.
    skip_upsampler_blocks: int = 0
    # Deterministic output (temperature-0 image): "mode" = the most likely mixture
    # component's mean (VDVAE's choice), "mean" = the mixture's expected value (what
    # PSNR rewards).
    head_statistic: str = "mode"
    # What the HR encoder (the posterior's eyes, training only) reads: "hr", VDVAE's choice,
    # or "residual", the HR image minus the LR skip's prediction, i.e. exactly what the
    # latents are there to carry (needs lr_skip).
    posterior_input: str = "hr"
    input_shift: float = IMAGENET64_STATS[0]
    input_scale: float = IMAGENET64_STATS[1]
    scale_factor: int = field(default=4)

    def __post_init__(self) -> None:
        if self.head_statistic not in HEAD_STATISTICS:
            raise ValueError(f"head_statistic must be one of {HEAD_STATISTICS}, got {self.head_statistic!r}")
        if self.posterior_input not in ("hr", "residual") or (self.posterior_input == "residual" and not self.lr_skip):
            raise ValueError(f"posterior_input must be 'hr' or 'residual' (with lr_skip), got {self.posterior_input!r}")
        if self.skip_upsampler_width < 0 or (self.skip_upsampler_width and not self.lr_skip):
            raise ValueError("skip_upsampler_width needs lr_skip and must be >= 0")
        if self.skip_upsampler_blocks < 0 or (self.skip_upsampler_blocks and not self.skip_upsampler_width):
            raise ValueError("skip_upsampler_blocks needs skip_upsampler_width and must be >= 0")
        if self.hr_size != self.lr_size * self.scale_factor:
            raise ValueError(
                f"hr_size {self.hr_size} must be scale_factor {self.scale_factor} x lr_size {self.lr_size}"
            )
        ends = {}
        for label, blocks, top in (
            ("enc_blocks", self.enc_blocks, self.hr_size),
            ("lr_enc_blocks", self.lr_enc_blocks, self.lr_size),
        ):
            resolutions = encoder_resolutions(blocks, top)
            ends[label] = resolutions
            if not self.fully_convolutional and resolutions[-1] != 1:
                raise ValueError(f"{label} must pool down to 1x1, ends at {resolutions[-1]}")
            if self.fully_convolutional and resolutions[-1] < 2:
                raise ValueError(f"{label}: a fully convolutional model pools to no 1x1 state (ends at 1)")
        dec = parse_layer_string(self.dec_blocks)
        start = dec[0][0] if dec else None
        if self.fully_convolutional:
            if start not in ends["lr_enc_blocks"] or dec[0][1] is not None:
                raise ValueError(
                    f"dec_blocks must start, without a mixin, at a resolution the LR encoder "
                    f"provides ({ends['lr_enc_blocks']}), starts at {start}"
                )
            if not self.lr_skip:
                raise ValueError("a fully convolutional preset needs lr_skip")
        elif start != 1:
            raise ValueError("dec_blocks must start at resolution 1")
        if max(res for res, _ in dec) != self.hr_size:
            raise ValueError(f"dec_blocks must end at hr_size {self.hr_size}")
        widths = self.widths()
        for res, mixin in dec:
            if mixin is not None and widths[mixin] < widths[res]:
                raise ValueError(
                    f"block {res}m{mixin}: width may not grow with resolution ({widths[mixin]} -> {widths[res]})"
                )

    def widths(self) -> dict[int, int]:
        return width_map(self.width, self.custom_width_str)

    @property
    def lr_multiple(self) -> int:
        """LR sizes a fully convolutional model takes are multiples of this (its coarsest stride)."""
        coarsest = min(
            encoder_resolutions(self.lr_enc_blocks, self.lr_size)
            + [res for res, _ in parse_layer_string(self.dec_blocks)]
        )
        return self.lr_size // coarsest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VDVAESRConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


def parse_layer_string(s: str) -> list[tuple[int, int | None]]:
    """VDVAE's parser: '8x2,16m8,16d2' -> [(8, None), (8, None), (16, 8), (16, 2)]."""
    layers: list[tuple[int, int | None]] = []
    for part in s.split(","):
        part = part.strip()
        if "x" in part:
            res, num = part.split("x")
            layers += [(int(res), None)] * int(num)
        elif "m" in part:
            res, mixin = part.split("m")
            layers.append((int(res), int(mixin)))
        elif "d" in part:
            res, down = part.split("d")
            layers.append((int(res), int(down)))
        else:
            layers.append((int(part), None))
    return layers


def encoder_resolutions(blocks: str, top: int) -> list[int]:
    """Resolutions an encoder visits, checking each block sits at the current one."""
    res, seen = top, [top]
    for block_res, down in parse_layer_string(blocks):
        if block_res != res:
            raise ValueError(f"encoder block at {block_res} but the running resolution is {res} in '{blocks}'")
        if down:
            res //= down
            seen.append(res)
    return seen


def width_map(width: int, custom: str) -> dict[int, int]:
    mapping: dict[int, int] = defaultdict(lambda: width)
    for part in filter(None, custom.split(",")):
        res, w = part.split(":")
        mapping[int(res)] = int(w)
    return mapping


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False) -> nn.Conv2d:
    """VDVAE's convs: zero bias always, optionally zero weights."""
    c = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2)
    assert c.bias is not None
    nn.init.zeros_(c.bias)
    if zero_weights:
        nn.init.zeros_(c.weight)
    return c


class Block(nn.Module):
    """GELU-1x1-GELU-3x3-GELU-3x3-GELU-1x1 bottleneck; optional residual and avg-pool."""

    def __init__(
        self,
        in_width: int,
        middle_width: int,
        out_width: int,
        down_rate: int | None = None,
        residual: bool = False,
        use_3x3: bool = True,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        k = 3 if use_3x3 else 1
        self.c1 = conv(in_width, middle_width, 1)
        self.c2 = conv(middle_width, middle_width, k)
        self.c3 = conv(middle_width, middle_width, k)
        self.c4 = conv(middle_width, out_width, 1, zero_weights=zero_last)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


def pad_channels(t: Tensor, width: int) -> Tensor:
    return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1])) if t.shape[1] < width else t


class Encoder(nn.Module):
    """Bottom-up net; returns one activation per resolution (VDVAE's Encoder)."""

    def __init__(self, blocks: str, widths: dict[int, int], top_res: int, bottleneck: float) -> None:
        super().__init__()
        self.widths, self.top_res = widths, top_res
        layers = parse_layer_string(blocks)
        self.in_conv = conv(3, widths[top_res], 3)
        modules = [
            Block(
                widths[res], int(widths[res] * bottleneck), widths[res], down_rate=down, residual=True, use_3x3=res > 2
            )
            for res, down in layers
        ]
        for b in modules:
            b.c4.weight.data *= math.sqrt(1 / len(layers))
        self.enc_blocks = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        """Activations keyed by layer-string resolution (the spatial size for fixed-size models)."""
        x = self.in_conv(x)
        res = self.top_res
        acts = {res: x}
        for block in cast(list[Block], list(self.enc_blocks)):
            x = block(x)
            res //= block.down_rate or 1
            x = pad_channels(x, self.widths[res])
            acts[res] = x
        return acts


def gaussian_kl(mu1: Tensor, mu2: Tensor, logsigma1: Tensor, logsigma2: Tensor) -> Tensor:
    """KL(N(mu1, s1) || N(mu2, s2)) per element, with log-std parameters (VDVAE's form)."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


class DecBlock(nn.Module):
    """One top-down block: prior, (posterior), latent projection, residual net.

    ``posterior`` is VDVAE's ``enc`` (renamed on import). ``lr_gate`` exists only
    on SR blocks at resolutions that receive LR features; it starts at zero so
    the pretrained unconditional path is untouched at step 0 (ReZero-style).
    """

    def __init__(self, res: int, mixin: int | None, n_blocks: int, cfg: VDVAESRConfig, lr_gated: bool) -> None:
        super().__init__()
        self.res, self.mixin, self.zdim = res, mixin, cfg.zdim
        width = cfg.widths()[res]
        cond_width = int(width * cfg.bottleneck_multiple)
        use_3x3 = res > 2
        self.posterior = Block(width * 2, cond_width, cfg.zdim * 2, use_3x3=use_3x3)
        self.prior = Block(width, cond_width, cfg.zdim * 2 + width, use_3x3=use_3x3, zero_last=True)
        self.z_proj = conv(cfg.zdim, width, 1)
        self.z_proj.weight.data *= math.sqrt(1 / n_blocks)
        self.resnet = Block(width, cond_width, width, residual=True, use_3x3=use_3x3)
        self.resnet.c4.weight.data *= math.sqrt(1 / n_blocks)
        self.lr_gate = nn.Parameter(torch.zeros(1, width, 1, 1)) if lr_gated else None

    def prior_params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.prior(x)
        z = self.zdim
        return feats[:, :z], feats[:, z : 2 * z], feats[:, 2 * z :]

    def forward(
        self, x: Tensor, hr_act: Tensor | None, eps: Tensor | None, z_given: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Posterior path when ``hr_act`` is given (z = qm + exp(qv) * eps, eps=None -> mean),
        else prior path (z = pm + exp(pv) * eps, eps already temperature-scaled; None -> pm).
        ``z_given`` overrides z (decoding from latents)."""
        pm, pv, x_pp = self.prior_params(x)
        stats: dict[str, Tensor] = {}
        if hr_act is not None:
            qm, qv = self.posterior(torch.cat([x, hr_act], dim=1)).chunk(2, dim=1)
            z = qm if eps is None else qm + qv.exp() * eps
            stats["kl"] = gaussian_kl(qm.float(), pm.float(), qv.float(), pv.float())
        else:
            z = pm if eps is None else pm + pv.exp() * eps
        if z_given is not None:
            z = z_given
        stats["z"] = z
        x = x + x_pp
        x = x + self.z_proj(z)
        return self.resnet(x), stats


class Decoder(nn.Module):
    """VDVAE's top-down decoder; with ``lr_acts`` it becomes VDVAE-SR's conditional one."""

    def __init__(self, cfg: VDVAESRConfig, lr_resolutions: list[int] | None) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        layers = parse_layer_string(cfg.dec_blocks)
        # p(z0|y): the resolution whose state is the LR encoder's activation itself.
        self.lr_start = layers[0][0] if cfg.fully_convolutional else 1
        inject = set(lr_resolutions or []) - {self.lr_start}
        if cfg.lr_inject_max_res is not None:
            inject = {r for r in inject if r <= cfg.lr_inject_max_res}
        self.dec_blocks = nn.ModuleList(
            DecBlock(res, mixin, len(layers), cfg, lr_gated=res in inject) for res, mixin in layers
        )
        self.resolutions = sorted({res for res, _ in layers})
        # Fixed-size learned start states are VDVAE's; a fully convolutional model has none.
        self.bias_xs = nn.ParameterDict(
            {}
            if cfg.fully_convolutional
            else {
                str(r): nn.Parameter(torch.zeros(1, widths[r], r, r))
                for r in self.resolutions
                if r <= cfg.no_bias_above
            }
        )
        out_width = widths[cfg.hr_size]
        self.gain = nn.Parameter(torch.ones(1, out_width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, out_width, 1, 1))
        self.out_conv = conv(out_width, cfg.num_mixtures * 10, 1)

    def blocks(self) -> list[DecBlock]:
        return cast(list[DecBlock], list(self.dec_blocks))

    def state_size(self, res: int, hr_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of the state at ``res`` for an HR output of ``hr_hw`` (res x res when fixed-size)."""
        if not self.cfg.fully_convolutional:
            return res, res
        return hr_hw[0] * res // self.cfg.hr_size, hr_hw[1] * res // self.cfg.hr_size

    def initial_state(self, res: int, n: int, ref: Tensor, hr_hw: tuple[int, int]) -> Tensor:
        if str(res) in self.bias_xs:
            return self.bias_xs[str(res)].expand(n, -1, -1, -1)
        return ref.new_zeros(n, self.cfg.widths()[res], *self.state_size(res, hr_hw))

    def forward(
        self,
        n: int,
        ref: Tensor,
        lr_acts: dict[int, Tensor] | None = None,
        hr_acts: dict[int, Tensor] | None = None,
        eps: list[Tensor | None] | None = None,
        z_given: list[Tensor] | None = None,
        hr_hw: tuple[int, int] | None = None,
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Run every block; returns the final state after gain/bias (VDVAE's px_z) and per-block stats.

        ``ref`` only supplies dtype/device for zero states; ``hr_hw`` is the output
        size (fully convolutional models only; fixed-size ones know theirs).
        """
        hw = hr_hw or (self.cfg.hr_size, self.cfg.hr_size)
        xs: dict[int, Tensor] = {}
        stats = []
        for i, block in enumerate(self.blocks()):
            res = block.res
            if res not in xs:
                from_lr = lr_acts is not None and res == self.lr_start
                xs[res] = lr_acts[res] if from_lr and lr_acts is not None else self.initial_state(res, n, ref, hw)
            x = xs[res]
            if block.mixin is not None:
                x = x + F.interpolate(xs[block.mixin][:, : x.shape[1]], scale_factor=res // block.mixin)
            if block.lr_gate is not None and lr_acts is not None:
                x = x + block.lr_gate * lr_acts[res]
            x, block_stats = block(
                x,
                hr_acts[res] if hr_acts is not None else None,
                eps[i] if eps is not None else None,
                z_given[i] if z_given is not None else None,
            )
            xs[res] = x
            stats.append(block_stats)
        return xs[max(xs)] * self.gain + self.bias, stats


# ---------------------------------------------------------------------------
# Discretized mixture of logistics (VDVAE / PixelCNN++), NCHW parameters
# ---------------------------------------------------------------------------


def dmol_split(logits: Tensor, nr_mix: int, base: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[N, 10*M, H, W] -> logit_probs [N,M,H,W], means, log_scales, coeffs [N,3,M,H,W].

    Channel order equals VDVAE's NHWC last axis, so the same weights apply.
    ``base`` [N,3,H,W] is added to every component's mean (the LR skip).
    """
    n, _, h, w = logits.shape
    logit_probs = logits[:, :nr_mix]
    rest = logits[:, nr_mix:].reshape(n, 3, 3 * nr_mix, h, w)
    means = rest[:, :, :nr_mix]
    if base is not None:
        means = means + base.unsqueeze(2)
    log_scales = rest[:, :, nr_mix : 2 * nr_mix].clamp(min=-7.0)
    coeffs = torch.tanh(rest[:, :, 2 * nr_mix :])
    return logit_probs, means, log_scales, coeffs


def dmol_nll(
    x: Tensor,
    logits: Tensor,
    nr_mix: int,
    low_bit: bool = False,
    base: Tensor | None = None,
    max_log_scale: float | None = None,
) -> Tensor:
    """Per-image NLL per dimension of x in [-1, 1] (VDVAE's discretized_mix_logistic_loss).

    ``max_log_scale`` caps the logistic scales (training only): a residual wider
    than the cap cannot be called per-pixel noise, so the latents must explain it.
    """
    ndims = x[0].numel()
    logit_probs, means, log_scales, coeffs = dmol_split(logits, nr_mix, base)
    if max_log_scale is not None:
        log_scales = log_scales.clamp(max=max_log_scale)
    x = x.unsqueeze(2)  # [N, 3, 1, H, W], broadcast over the mixture axis
    m2 = means[:, 1:2] + coeffs[:, 0:1] * x[:, 0:1]
    m3 = means[:, 2:3] + coeffs[:, 1:2] * x[:, 0:1] + coeffs[:, 2:3] * x[:, 1:2]
    means = torch.cat([means[:, 0:1], m2, m3], dim=1)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    half_bin = 1.0 / 31.0 if low_bit else 1.0 / 255.0
    plus_in = inv_stdv * (centered + half_bin)
    min_in = inv_stdv * (centered - half_bin)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    bins_half = 15.5 if low_bit else 127.5
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999,
            log_one_minus_cdf_min,
            torch.where(
                cdf_delta > 1e-5,
                torch.log(cdf_delta.clamp(min=1e-12)),
                log_pdf_mid - math.log(bins_half),
            ),
        ),
    )
    log_probs = log_probs.sum(dim=1) + torch.log_softmax(logit_probs, dim=1)
    return -torch.logsumexp(log_probs, dim=1).sum(dim=(1, 2)) / ndims


def dmol_mode(logits: Tensor, nr_mix: int, base: Tensor | None = None) -> Tensor:
    """Deterministic head: the most likely component's mean, channel-autoregressive, in [-1, 1].

    Selection is a one-hot product rather than a gather so exporters and FP16
    engines see only elementwise ops and reductions.
    """
    logit_probs, means, _, coeffs = dmol_split(logits, nr_mix, base)
    sel = F.one_hot(logit_probs.argmax(dim=1), nr_mix).permute(0, 3, 1, 2).unsqueeze(1).to(means.dtype)
    return dmol_autoregress((means * sel).sum(dim=2), (coeffs * sel).sum(dim=2))


def dmol_mean(logits: Tensor, nr_mix: int, base: Tensor | None = None) -> Tensor:
    """Deterministic head: the mixture's expected value in [-1, 1] (the MSE-optimal guess).

    Each component's mean is channel-autoregressive in its own means (E[x1 | k] =
    mu1 + c0 * mu0, ...); components are weighted by their softmax probabilities.
    Clipping to [-1, 1] comes last, so pixels near the ends are approximate.
    """
    logit_probs, means, _, coeffs = dmol_split(logits, nr_mix, base)
    m0 = means[:, 0]
    m1 = means[:, 1] + coeffs[:, 0] * m0
    m2 = means[:, 2] + coeffs[:, 1] * m0 + coeffs[:, 2] * m1
    weights = torch.softmax(logit_probs, dim=1)
    return torch.stack([(weights * m).sum(dim=1) for m in (m0, m1, m2)], dim=1).clamp(-1.0, 1.0)


def dmol_sample(
    logits: Tensor, nr_mix: int, base: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Stochastic head: Gumbel-max component choice, then a logistic sample (VDVAE's sampler)."""
    logit_probs, means, log_scales, coeffs = dmol_split(logits, nr_mix, base)
    u = torch.rand(logit_probs.shape, generator=generator, device=logits.device) * (1 - 2e-5) + 1e-5
    sel = F.one_hot((logit_probs - torch.log(-torch.log(u))).argmax(dim=1), nr_mix)
    sel = sel.permute(0, 3, 1, 2).unsqueeze(1).to(means.dtype)
    mean = (means * sel).sum(dim=2)
    log_scale = (log_scales * sel).sum(dim=2)
    u = torch.rand(mean.shape, generator=generator, device=logits.device) * (1 - 2e-5) + 1e-5
    x = mean + log_scale.exp() * (torch.log(u) - torch.log(1.0 - u))
    return dmol_autoregress(x, (coeffs * sel).sum(dim=2))


def dmol_autoregress(x: Tensor, coeffs: Tensor) -> Tensor:
    x0 = x[:, 0].clamp(-1.0, 1.0)
    x1 = (x[:, 1] + coeffs[:, 0] * x0).clamp(-1.0, 1.0)
    x2 = (x[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1.0, 1.0)
    return torch.stack([x0, x1, x2], dim=1)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class SkipResBlock(nn.Module):
    """conv3x3 -> GELU -> conv3x3 plus the input; the second conv starts at zero (an identity)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = conv(width, width, 3)
        self.c2 = conv(width, width, 3, zero_weights=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(F.gelu(self.c1(x)))


class SkipUpsampler(nn.Module):
    """Learned x``scale`` residual over the bicubic skip, from LR features (ESPCN-style).

    Capacity at the LR resolution is where SR networks spend theirs: 3x3 convs per LR
    pixel (optionally ``blocks`` residual blocks between the two) predict all
    ``scale**2`` sub-pixels, rearranged by pixel shuffle. The last conv starts at
    zero, so an untrained model still outputs bicubic.
    """

    def __init__(self, in_width: int, width: int, scale: int, blocks: int = 0) -> None:
        super().__init__()
        self.scale = scale
        self.c1 = conv(in_width, width, 3)
        self.body = nn.ModuleList(SkipResBlock(width) for _ in range(blocks))
        self.c2 = conv(width, 3 * scale * scale, 3, zero_weights=True)

    def forward(self, feats: Tensor) -> Tensor:
        h = F.gelu(self.c1(feats))
        for block in self.body:
            h = block(h)
        return F.pixel_shuffle(self.c2(h), self.scale)

    def reach(self) -> int:
        """LR pixels each side that one output pixel sees through these convs."""
        return 2 + 2 * len(self.body)


LR_SKIP_INIT_LOG_SCALES = (-5.0, -3.0)
LR_SKIP_INIT_WEIGHT_STD = 1e-3
# The residual over the LR skip has a std of ~0.05 in [-1, 1] units; x8 brings it
# near the HR encoder's usual input scale.
RESIDUAL_INPUT_GAIN = 8.0


class VDVAESR(nn.Module):
    """HR encoder + LR encoder + conditional top-down decoder + DMoL head."""

    def __init__(self, config: VDVAESRConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths()
        self.hr_encoder = Encoder(config.enc_blocks, widths, config.hr_size, config.bottleneck_multiple)
        self.lr_encoder = Encoder(config.lr_enc_blocks, widths, config.lr_size, config.bottleneck_multiple)
        self.lr_resolutions = encoder_resolutions(config.lr_enc_blocks, config.lr_size)
        self.decoder = Decoder(config, self.lr_resolutions)
        self.skip_upsampler = (
            SkipUpsampler(
                widths[config.lr_size], config.skip_upsampler_width, config.scale_factor, config.skip_upsampler_blocks
            )
            if config.skip_upsampler_width
            else None
        )
        if config.lr_skip:
            # Start near the bicubic image (tiny head weights) with logistic scales near
            # bicubic's error (e^-5..e^-3, ~1-6 grey levels) instead of VDVAE's e^0 = the
            # whole range: otherwise thousands of CPU steps go into shrinking one bias.
            # Weights and scales differ per component: identical components would get
            # identical gradients and the mixture could never separate.
            m = config.num_mixtures
            nn.init.normal_(self.decoder.out_conv.weight, std=LR_SKIP_INIT_WEIGHT_STD)
            assert self.decoder.out_conv.bias is not None
            bias = self.decoder.out_conv.bias.data.view(-1)[m:].view(3, 3 * m)
            bias[:, m : 2 * m] = torch.linspace(*LR_SKIP_INIT_LOG_SCALES, m)

    # -- preprocessing -------------------------------------------------------
    def encoder_input(self, img01: Tensor) -> Tensor:
        """[0, 1] RGB -> the encoders' statistics: (x_uint8 + shift) * scale."""
        return (img01 * 255.0 + self.config.input_shift) * self.config.input_scale

    # -- latent layout -------------------------------------------------------
    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(zdim, r, r) per decoder block, in decoder order (at the training crop for fully convolutional ones)."""
        return self.latent_shapes_for((self.config.hr_size, self.config.hr_size))

    def latent_shapes_for(self, hr_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(zdim, h, w) per decoder block for an HR output of ``hr_hw``."""
        return [(self.config.zdim, *self.decoder.state_size(b.res, hr_hw)) for b in self.decoder.blocks()]

    @property
    def noise_levels(self) -> list[tuple[int, int]]:
        """(resolution, number of blocks) per latent level, coarse to fine.

        A fully convolutional model takes one noise map per level,
        ``[N, zdim * blocks, h * r / lr_size, w * r / lr_size]``, the blocks'
        channels in decoder order.
        """
        counts: dict[int, int] = {}
        for b in self.decoder.blocks():
            counts[b.res] = counts.get(b.res, 0) + 1
        return list(counts.items())

    def split_levels(self, levels: list[Tensor]) -> list[Tensor]:
        """Per-level noise maps -> one ``[N, zdim, h, w]`` tensor per block (decoder order)."""
        if len(levels) != len(self.noise_levels):
            raise ValueError(f"expected {len(self.noise_levels)} noise levels, got {len(levels)}")
        chunks = {
            res: list(t.split(self.config.zdim, dim=1)) for (res, _), t in zip(self.noise_levels, levels, strict=True)
        }
        return [chunks[b.res].pop(0) for b in self.decoder.blocks()]

    @property
    def noise_dim(self) -> int:
        """Length of the packed per-sample noise vector that ``sample`` takes."""
        return sum(c * h * w for c, h, w in self.latent_shapes)

    def unpack_noise(self, noise: Tensor) -> list[Tensor]:
        """[N, noise_dim] -> one [N, zdim, r, r] tensor per block (decoder order)."""
        out, offset = [], 0
        for c, h, w in self.latent_shapes:
            out.append(noise[:, offset : offset + c * h * w].reshape(-1, c, h, w))
            offset += c * h * w
        return out

    def receptive_radius(self) -> int:
        """How far (in LR pixels) an output pixel can see, an upper bound from the architecture.

        A fully convolutional model's output at an LR position depends on LR
        pixels at most this far away in x or y, so a tile overlapped by it on
        every side (and placed at a multiple of ``lr_multiple``) reproduces the
        whole-image result in its centre. Each 3x3 conv at resolution r reaches
        lr_size / r LR pixels; pooling and nearest upsampling add their window.
        """
        cfg = self.config

        def stride(res: int) -> float:
            return cfg.lr_size / res

        def encoder_reach(blocks: str) -> dict[int, float]:
            res, reach = cfg.lr_size, stride(cfg.lr_size)  # the 3x3 input conv
            out = {res: reach}
            for block_res, down in parse_layer_string(blocks):
                reach += 2 * stride(block_res) if block_res > 2 else 0
                if down:
                    reach += (down - 1) * stride(block_res)
                    res //= down
                out[res] = reach
            return out

        lr_reach = encoder_reach(cfg.lr_enc_blocks)
        states: dict[int, float] = {}
        for block in self.decoder.blocks():
            res, s = block.res, stride(block.res)
            reach = states.get(res, lr_reach.get(res, 0.0) if res == self.decoder.lr_start else 0.0)
            if block.mixin is not None:
                reach = max(reach, states[block.mixin] + stride(block.mixin))
            if block.lr_gate is not None:
                reach = max(reach, lr_reach[res])
            states[res] = reach + (4 * s if res > 2 else 0)  # prior's and resnet's two 3x3 convs each
        reach = states[max(states)]
        if cfg.lr_skip:
            skip = lr_reach[cfg.lr_size] + (self.skip_upsampler.reach() if self.skip_upsampler is not None else 0)
            reach = max(reach, skip, 2.0)  # 2: bicubic's support
        return math.ceil(reach)

    # -- training ------------------------------------------------------------
    def forward(
        self,
        hr: Tensor,
        lr: Tensor | None = None,
        objective: str = "elbo",
        free_bits: float = 0.0,
        prior_l1: bool = False,
        max_log_scale: float | None = None,
    ) -> dict[str, Tensor]:
        """Negative ELBO per dimension (VDVAE's loss) for HR images in [0, 1].

        Returns per-image ``elbo``, ``distortion`` and ``rate`` [N], averaged by the caller.
        ``lr`` defaults to nothing only for pure VDVAE use; SR training always passes it.
        ``objective="skip"`` returns ``{"loss": skip_loss}`` instead (the conditioning warm-up).
        ``prior_l1`` adds ``prior_l1``: the L1 (in [0, 1] units) of the temperature-0
        output, the prior-mean path that users run. The ELBO trains the decoder on
        posterior latents; once those carry texture, the prior mean is a latent the
        decoder rarely sees, and this term keeps the output for it the best guess.
        """
        if objective == "skip":
            if lr is None:
                raise ValueError("the skip objective needs the LR image")
            return {"loss": self.skip_loss(hr, lr)}
        if objective != "elbo":
            raise ValueError(f"objective must be 'elbo' or 'skip', got {objective!r}")
        lr_acts = self.lr_encoder(self.encoder_input(lr)) if lr is not None else None
        px_z, stats = self.posterior_pass(hr, lr, lr_acts=lr_acts)
        base = self.mean_base(lr, lr_acts)
        out = self.loss_from(px_z, stats, hr, base, free_bits, max_log_scale)
        if prior_l1:
            if lr is None:
                raise ValueError("prior_l1 needs the LR image")
            px0, _ = self.decoder(hr.shape[0], hr, lr_acts=lr_acts, hr_hw=(hr.shape[2], hr.shape[3]))
            x0 = self.deterministic_head(self.decoder.out_conv(px0).float(), base)
            out["prior_l1"] = (x0 - (hr * 2.0 - 1.0)).abs().mean(dim=(1, 2, 3)) * 0.5
        return out

    def deterministic_head(self, logits: Tensor, base: Tensor | None) -> Tensor:
        """The temperature-0 image in [-1, 1] from DMoL logits: ``head_statistic``'s choice."""
        if self.config.head_statistic == "mean":
            return dmol_mean(logits, self.config.num_mixtures, base)
        return dmol_mode(logits, self.config.num_mixtures, base)

    def posterior_pass(
        self,
        hr: Tensor,
        lr: Tensor | None,
        eps: list[Tensor | None] | None = None,
        lr_acts: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        if lr_acts is None and lr is not None:
            lr_acts = self.lr_encoder(self.encoder_input(lr))
        hr_acts = self.hr_encoder(self.posterior_input(hr, lr, lr_acts))
        hr_hw = (hr.shape[2], hr.shape[3])
        if eps is None:
            eps = [
                torch.randn(hr.shape[0], c, h, w, device=hr.device, dtype=hr.dtype)
                for c, h, w in self.latent_shapes_for(hr_hw)
            ]
        return self.decoder(hr.shape[0], hr, lr_acts=lr_acts, hr_acts=hr_acts, eps=eps, hr_hw=hr_hw)

    def posterior_input(self, hr: Tensor, lr: Tensor | None, lr_acts: dict[int, Tensor] | None) -> Tensor:
        """The HR encoder's input: the HR image, or its residual over the (detached) LR skip, amplified."""
        if self.config.posterior_input == "hr":
            return self.encoder_input(hr)
        base = self.mean_base(lr, lr_acts)
        if base is None:
            raise ValueError("a posterior that reads the residual needs the LR image")
        return (hr * 2.0 - 1.0 - base.detach()) * RESIDUAL_INPUT_GAIN

    def mean_base(self, lr: Tensor | None, lr_acts: dict[int, Tensor] | None = None) -> Tensor | None:
        """The LR skip in [-1, 1]: bicubic x4 of the LR image, plus the learned upsampler's
        residual when the config has one; None when the config has no skip."""
        if not self.config.lr_skip or lr is None:
            return None
        base = F.interpolate(lr * 2.0 - 1.0, scale_factor=self.config.scale_factor, mode="bicubic", align_corners=False)
        if self.skip_upsampler is not None:
            if lr_acts is None:
                lr_acts = self.lr_encoder(self.encoder_input(lr))
            base = base + self.skip_upsampler(lr_acts[self.config.lr_size])
        return base

    def skip_loss(self, hr: Tensor, lr: Tensor) -> Tensor:
        """Per-image L1 (in [0, 1] units) of the deterministic skip alone: LR encoder + upsampler.

        The conditioning warm-up objective (sr-train --objective skip): it trains the
        LR path at the LR resolution's cost, before the ELBO trains everything.
        """
        base = self.mean_base(lr)
        if base is None:
            raise ValueError(f"{self.config.name} has no LR skip to train (lr_skip is off)")
        return (base.float().clamp(-1.0, 1.0) - (hr * 2.0 - 1.0)).abs().mean(dim=(1, 2, 3)) * 0.5

    def loss_from(
        self,
        px_z: Tensor,
        stats: list[dict[str, Tensor]],
        hr: Tensor,
        base: Tensor | None = None,
        free_bits: float = 0.0,
        max_log_scale: float | None = None,
    ) -> dict[str, Tensor]:
        """Per-image ``elbo``, ``distortion``, ``rate`` (nats per image dimension), the rate of each
        latent level (``rate/<res>``), and ``rate_objective``: the rate term to optimise.

        With ``free_bits`` > 0 each latent channel of each block costs at least that
        many nats per position, averaged over the batch (Kingma et al. 2016): below
        the floor its KL is free, so the posterior has room to carry what the
        decoder cannot guess from the LR image (texture) instead of collapsing.
        """
        target = hr * 2.0 - 1.0
        logits = self.decoder.out_conv(px_z).float()  # the DMoL likelihood in fp32 under autocast
        distortion = dmol_nll(target, logits, self.config.num_mixtures, self.config.low_bit, base, max_log_scale)
        ndims = hr[0].numel()
        per_block = [s["kl"].sum(dim=(1, 2, 3)) / ndims for s in stats]
        rate = torch.stack(per_block).sum(0)
        out = {"elbo": distortion + rate, "distortion": distortion, "rate": rate}
        for block, block_rate in zip(self.decoder.blocks(), per_block, strict=True):
            key = f"rate/{block.res}"
            out[key] = out[key] + block_rate if key in out else block_rate
        if free_bits > 0:
            floored = [
                s["kl"].mean(dim=(0, 2, 3)).clamp(min=free_bits).sum() * s["kl"][0, 0].numel() / ndims for s in stats
            ]
            out["rate_objective"] = torch.stack(floored).sum().expand_as(rate)
        else:
            out["rate_objective"] = rate
        return out

    # -- super-resolution (the exported path) -----------------------------------
    def sample(
        self,
        lr: Tensor,
        noise: Tensor | list[Tensor] | None,
        stochastic_head: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Conditional prior sampling: LR [N,3,h,w] in [0,1] + noise -> HR [N,3,4h,4w] in [0,1].

        ``noise`` is standard normal already multiplied by the temperature: one
        packed ``[N, noise_dim]`` tensor (fixed-size models), a list of per-level
        maps (``noise_levels``; fully convolutional models), or None for the
        deterministic, most likely latent path (z = prior mean, same as zeros).
        No random op runs unless ``stochastic_head``.
        """
        if self.config.fully_convolutional and (
            lr.shape[2] % self.config.lr_multiple or lr.shape[3] % self.config.lr_multiple
        ):
            raise ValueError(
                f"{self.config.name}: LR height and width must be multiples of "
                f"{self.config.lr_multiple}, got {tuple(lr.shape[2:])}"
            )
        lr_acts = self.lr_encoder(self.encoder_input(lr))
        if noise is None:
            eps: list[Tensor | None] | None = None
        elif isinstance(noise, Tensor):
            eps = list(self.unpack_noise(noise))
        else:
            eps = list(self.split_levels(noise))
        hr_hw = (lr.shape[2] * self.config.scale_factor, lr.shape[3] * self.config.scale_factor)
        px_z, _ = self.decoder(lr.shape[0], lr, lr_acts=lr_acts, eps=eps, hr_hw=hr_hw)
        logits = self.decoder.out_conv(px_z)
        base = self.mean_base(lr, lr_acts)
        if stochastic_head:
            x = dmol_sample(logits, self.config.num_mixtures, base, generator)
        else:
            x = self.deterministic_head(logits, base)
        return (x + 1.0) * 0.5

    def make_noise(self, n: int, temperature: float, seed: int, device: torch.device | str = "cpu") -> Tensor:
        """Packed noise of a fixed-size model: a fresh draw per batch row."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(n, self.noise_dim, generator=g) * temperature).to(device)

    def make_level_noise(
        self, n: int, lr_hw: tuple[int, int], temperature: float, seed: int, device: torch.device | str = "cpu"
    ) -> list[Tensor]:
        """Per-level noise of a fully convolutional model: the runtime's position-keyed noise
        (``sr_runtime.noise.position_noise``, stream = level index) for a frame at the origin,
        the same for every batch row, so this and the runtime sample identically."""
        from sr_runtime.noise import position_noise

        hr_hw = (lr_hw[0] * self.config.scale_factor, lr_hw[1] * self.config.scale_factor)
        out = []
        for level, (res, count) in enumerate(self.noise_levels):
            h, w = self.decoder.state_size(res, hr_hw)
            maps = torch.from_numpy(position_noise(seed, level, self.config.zdim * count, 0, 0, h, w)) * temperature
            out.append(maps.expand(n, -1, -1, -1).to(device))
        return out

    @torch.no_grad()
    def sample_seeded(self, lr: Tensor, temperature: float = 0.0, seed: int = 0) -> Tensor:
        """Convenience: draw the noise from ``seed`` at ``temperature`` and sample."""
        if temperature == 0:
            return self.sample(lr, None)
        if self.config.fully_convolutional:
            levels = self.make_level_noise(lr.shape[0], (lr.shape[2], lr.shape[3]), temperature, seed, lr.device)
            return self.sample(lr, [t.to(lr.dtype) for t in levels])
        return self.sample(lr, self.make_noise(lr.shape[0], temperature, seed, lr.device).to(lr.dtype))


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

IMAGENET64_DEC = "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12"
IMAGENET64_ENC = "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"
FFHQ256_DEC = "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128"
FFHQ256_ENC = "256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4"


def _paper_64(**overrides: Any) -> VDVAESRConfig:
    base: dict[str, Any] = {
        "name": "paper-64",
        "hr_size": 64,
        "lr_size": 16,
        "width": 512,
        "enc_blocks": IMAGENET64_ENC,
        "dec_blocks": IMAGENET64_DEC,
        "lr_enc_blocks": "16x9,16d2,8x8,8d2,4x7,4d4,1x5",
        "zdim": 16,
        "num_mixtures": 10,
        "no_bias_above": 64,
        "input_shift": IMAGENET64_STATS[0],
        "input_scale": IMAGENET64_STATS[1],
    }
    return VDVAESRConfig(**{**base, **overrides})


def _paper_256(**overrides: Any) -> VDVAESRConfig:
    base: dict[str, Any] = {
        "name": "paper-256",
        "hr_size": 256,
        "lr_size": 64,
        "width": 512,
        "enc_blocks": FFHQ256_ENC,
        "dec_blocks": FFHQ256_DEC,
        "lr_enc_blocks": IMAGENET64_ENC,
        "zdim": 16,
        "num_mixtures": 10,
        "no_bias_above": 64,
        "low_bit": True,
        "input_shift": FFHQ256_STATS[0],
        "input_scale": FFHQ256_STATS[1],
    }
    return VDVAESRConfig(**{**base, **overrides})


def _small_256(**overrides: Any) -> VDVAESRConfig:
    """The shipped default: CPU-trainable 64 -> 256 (project design, see README)."""
    base: dict[str, Any] = {
        "name": "small-256",
        "hr_size": 256,
        "lr_size": 64,
        "width": 64,
        "custom_width_str": "128:32,256:16",
        "enc_blocks": "256x1,256d2,128x1,128d2,64x2,64d2,32x2,32d2,16x2,16d4,4x2,4d4,1x1",
        "dec_blocks": "1x1,4m1,4x1,16m4,16x1,32m16,32x2,64m32,64x5,128m64,128x1,256m128",
        "lr_enc_blocks": "64x8,64d2,32x2,32d2,16x2,16d4,4x2,4d4,1x1",
        "zdim": 8,
        "num_mixtures": 5,
        "no_bias_above": 64,
        "lr_skip": True,
        "skip_upsampler_width": 64,
        "head_statistic": "mean",
        "input_shift": IMAGENET64_STATS[0],
        "input_scale": IMAGENET64_STATS[1],
    }
    return VDVAESRConfig(**{**base, **overrides})


def _fc_256(**overrides: Any) -> VDVAESRConfig:
    """Fully convolutional VDVAE-SR (project design): levels LR/4 ... 4 x LR, named at a 64 -> 256 crop.

    The encoders are small-256's without their pooling to 1x1, so its trained LR
    path transfers; the decoder starts from the LR encoder's LR/4 map (p(z0|y))
    and has latents at every level; the output head predicts a residual over the
    learned skip upsampler (capacity at the LR resolution, ending in a pixel shuffle).
    """
    base: dict[str, Any] = {
        "name": "fc-256",
        "hr_size": 256,
        "lr_size": 64,
        "width": 64,
        "custom_width_str": "128:32,256:16",
        "enc_blocks": "256x1,256d2,128x1,128d2,64x2,64d2,32x2,32d2,16x2",
        "dec_blocks": "16x2,32m16,32x2,64m32,64x5,128m64,128x1,256m128",
        "lr_enc_blocks": "64x8,64d2,32x2,32d2,16x2",
        "zdim": 4,
        "num_mixtures": 5,
        "lr_skip": True,
        "skip_upsampler_width": 64,
        "head_statistic": "mean",
        "fully_convolutional": True,
        "input_shift": IMAGENET64_STATS[0],
        "input_scale": IMAGENET64_STATS[1],
    }
    return VDVAESRConfig(**{**base, **overrides})


def _fc_256_deep(**overrides: Any) -> VDVAESRConfig:
    """fc-256 with 8 full-width residual blocks in the skip upsampler (capacity at the LR resolution).

    Grown from a trained fc-256 (``sr-train train --init-grow``): every fc-256 tensor
    keeps its name and shape, and the blocks start as identities.
    """
    return _fc_256(**{"name": "fc-256-deep", "skip_upsampler_blocks": 8, "posterior_input": "residual", **overrides})


PRESETS = {
    "paper-64": _paper_64,
    "paper-256": _paper_256,
    # The thesis code injected LR features only below 32x32.
    "paper-64-thesis": lambda **o: _paper_64(name="paper-64-thesis", lr_inject_max_res=16, **o),
    "paper-256-thesis": lambda **o: _paper_256(name="paper-256-thesis", lr_inject_max_res=16, **o),
    "small-256": _small_256,
    "fc-256": _fc_256,
    "fc-256-deep": _fc_256_deep,
}


def preset(name: str, **overrides: Any) -> VDVAESRConfig:
    """A named configuration; keyword overrides replace fields (e.g. width=32 for tests)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)
