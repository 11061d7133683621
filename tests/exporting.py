"""A tiny VDVAE-SR and an in-process `sr-export` call, for the tests that export."""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sr_train.model import VDVAESR


def tiny_model(seed: int = 0) -> VDVAESR:
    """A few-channel small-256 whose zero-initialised weights are perturbed (prior, gates, biases all matter)."""
    import torch

    from sr_train.model import VDVAESR, preset

    torch.manual_seed(seed)
    model = VDVAESR(preset("small-256", width=16, custom_width_str="", zdim=4, num_mixtures=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # off the zero init: prior, gates and biases all matter
    return model.eval()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`sr-export argv` in this process: (exit status, stdout, stderr)."""
    from sr_export import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argument errors
            rc = exc.code if isinstance(exc.code, int) else 2
            err.write(str(exc.code))
    return rc, out.getvalue(), err.getvalue()


def reaching_fc_model(seed: int = 0) -> VDVAESR:
    """An untrained fc-256 whose every weight is drawn N(0, 1/fan_in) and every LR gate opened.

    Freshly initialised, fc-256's residual branches end in zero convs, so its
    output hardly depends on anything beyond a few pixels and a tiling test
    would pass for any overlap; drawn like this, an output pixel measurably
    depends on LR pixels tens of pixels away.
    """
    import math

    import torch

    from sr_train.model import VDVAESR, preset

    torch.manual_seed(seed)
    model = VDVAESR(preset("fc-256"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        for block in model.decoder.blocks():
            if block.lr_gate is not None:
                block.lr_gate.fill_(1.0)
            # prior log-std 0: z = mean + noise stays finite at any temperature (a drawn log-std overflows exp)
            z = block.zdim
            block.prior.c4.weight[z : 2 * z].zero_()
            if block.prior.c4.bias is not None:
                block.prior.c4.bias[z : 2 * z].zero_()
    return model.eval()
