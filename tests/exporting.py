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
