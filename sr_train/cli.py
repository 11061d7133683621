"""``sr-train``: training and model inspection.

Subcommands: ``info`` (parameter counts and generation cost), ``vdvae-parity``
(compare against an official-VDVAE fixture), ``fetch-data`` (build the
training set), ``train``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sr_train.argtypes import non_negative_int, positive_int


def cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info
    from .model import preset

    if args.checkpoint:
        from .checkpoint import read_checkpoint_meta
        from .model import VDVAESRConfig

        meta = read_checkpoint_meta(args.checkpoint)
        config = VDVAESRConfig.from_dict(meta["model"])
        print(f"checkpoint: {args.checkpoint} (step {meta.get('step')}, {meta.get('weights')} weights)")
    else:
        config = preset(args.preset)
    print("\n".join(model_info(config).lines(config)))
    return 0


def cmd_vdvae_parity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .vdvae_reference import reference_dir, reference_pairs, worst_errors

    root = Path(args.reference) if args.reference else reference_dir()
    worst = worst_errors(reference_pairs(root))
    print(f"official VDVAE fixture: {root}")
    for group, err in worst.items():
        print(f"  {group:<40} max abs err {err:.2e}")
    return 0 if max(worst.values()) <= args.atol else 1


def cmd_train(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from .checkpoint import read_checkpoint_meta
    from .train import TrainConfig, check_run_dir, train

    run = Path(args.run_dir)
    if check_run_dir(run):
        model = read_checkpoint_meta(run / "latest").get("model")
        run_preset = model.get("name") if isinstance(model, dict) else None
        if args.preset is not None and args.preset != run_preset:
            raise ValueError(
                f"{run} is a {run_preset} run: resuming keeps its model, --preset {args.preset} "
                "cannot apply (use a new --run-dir)"
            )
        if args.init_checkpoint or args.init_vdvae or args.init_grow:
            raise ValueError(
                f"{run} is resumed from its own weights: --init-checkpoint/--init-vdvae/--init-grow apply to a new "
                "run only"
            )
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    result = train(TrainConfig(**values))
    if result["signal"] is not None:
        name = signal.Signals(result["signal"]).name
        print(
            f"sr-train: stopped by {name} at step {result['step']}, checkpoint saved in {run} (the same command "
            "resumes)",
            file=sys.stderr,
        )
        return 128 + int(result["signal"])
    last = result.get("elbo", result.get("loss"))
    tail = "no step left to run" if last is None else f"last loss {last:.4f}"
    print(f"done: step {result['step']}, skipped updates {result['skips']}, {tail}")
    return 0


def scale_range(text: str) -> tuple[float, float]:
    """argparse type: 'LO,HI' with 0 < LO <= HI <= 1."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.5,1), got {text!r}") from None
    if not (0 < lo <= hi <= 1):  # also false for NaN
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI <= 1, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts per component and GMAC per output tile")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small-256", help="preset name (default: small-256)")
    src.add_argument("--checkpoint", help="a checkpoint directory instead of a preset")
    info.set_defaults(func=cmd_info)

    parity = sub.add_parser("vdvae-parity", help="worst error per tensor group against an official-VDVAE fixture")
    parity.add_argument(
        "--reference", help="fixture directory (default: $VDVAE_REFERENCE_DIR or tests/fixtures/vdvae_reference)"
    )
    parity.add_argument("--atol", type=float, default=1e-4, help="exit 1 if any error exceeds this")
    parity.set_defaults(func=cmd_vdvae_parity)

    tr = sub.add_parser("train", help="train or resume (resumes when RUN_DIR holds a run)")
    tr.add_argument("--data", required=True, help="folder of training images (any size >= the HR tile)")
    tr.add_argument("--run-dir", required=True, help="where checkpoints and logs go; an existing run is resumed")
    tr.add_argument("--preset", help="model preset for a new run (default small-256)")
    tr.add_argument("--init-checkpoint", help="start from this checkpoint's weights")
    tr.add_argument("--init-vdvae", help="official VDVAE *-model(-ema).th for the HR encoder + decoder")
    tr.add_argument("--freeze-hr-encoder", action="store_true", default=None)
    tr.add_argument(
        "--freeze-lr-encoder",
        action="store_true",
        default=None,
        help="keep the LR encoder (the prior's conditioning at every level) as it is",
    )
    tr.add_argument("--train-decoder-blocks", help="decoder blocks that train, e.g. '0-10,40' (default all)")
    tr.add_argument(
        "--objective",
        choices=["elbo", "skip"],
        help="elbo (default): VDVAE's loss; skip: L1 of the LR skip alone (conditioning warm-up)",
    )
    tr.add_argument(
        "--kl-warmup-steps", type=non_negative_int, help="ramp the KL weight 0 -> 1 over these steps (default 0)"
    )
    tr.add_argument(
        "--free-bits",
        type=float,
        help="nats per latent channel and position that cost nothing (default 0: the plain ELBO)",
    )
    tr.add_argument(
        "--rate-weight",
        type=float,
        help="beta, the rate's weight in the loss: below 1 the latents may carry more (default 1: the ELBO)",
    )
    tr.add_argument(
        "--prior-l1-weight", type=float, help="add this x the L1 of the temperature-0 output to the ELBO (default 0)"
    )
    tr.add_argument(
        "--max-log-scale",
        type=float,
        help="cap the likelihood's logistic log-scales in the loss (e.g. -4.5): residual texture "
        "then has to be carried by the latents (default: no cap, VDVAE's loss)",
    )
    tr.add_argument(
        "--posterior-init-log-std",
        type=float,
        help="start a new decoder's posteriors at this log-std (e.g. -2): the latents carry the HR image "
        "from the first step instead of noise the decoder learns to ignore (default: VDVAE's init)",
    )
    tr.add_argument(
        "--posterior-input",
        choices=["hr", "residual"],
        help="what a new model's HR encoder reads: the HR image (VDVAE) or its residual over the LR skip, "
        "what the latents should carry (default: the preset's, hr)",
    )
    tr.add_argument(
        "--head-init-std",
        type=float,
        help="start a new decoder's output conv at this std (e.g. 0.05) instead of the LR-skip models' 1e-3, "
        "so the latents reach the output from the first step (default: the preset's init)",
    )
    tr.add_argument("--init-transfer", help="a new run's encoders and skip upsampler from this checkpoint")
    tr.add_argument(
        "--init-grow",
        help="a new run of a preset that extends this checkpoint's model (e.g. fc-256-deep from fc-256): every "
        "weight is taken, the added blocks start as identities",
    )
    tr.add_argument(
        "--crop-size",
        type=positive_int,
        help="HR training crop, a multiple of the model's stride (fully convolutional presets)",
    )
    tr.add_argument(
        "--scale-aug",
        type=scale_range,
        metavar="LO,HI",
        help="scale augmentation: downscale each HR crop's source by a random factor in [LO, HI] "
        "(e.g. 0.5,1; default off)",
    )
    tr.add_argument("--steps", type=positive_int, help="total steps (default 1000)")
    tr.add_argument("--batch-size", type=positive_int, help="per process (default 4)")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--warmup-steps", type=non_negative_int)
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--ema-rate", type=float)
    tr.add_argument("--grad-clip", type=float)
    tr.add_argument("--skip-threshold", type=float)
    tr.add_argument("--seed", type=non_negative_int)
    tr.add_argument("--log-every", type=positive_int)
    tr.add_argument("--save-every", type=positive_int)
    tr.add_argument("--val-every", type=positive_int)
    tr.add_argument("--val-images", help="folder for periodic EMA validation (docs/design.md, Evaluation protocol)")
    tr.add_argument("--val-temperature", type=float)
    tr.add_argument("--num-workers", type=non_negative_int)
    tr.add_argument("--threads", type=positive_int, help="torch CPU threads")
    tr.add_argument("--max-minutes", type=float, help="stop and save after this wall time (resume later)")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto (default): CUDA when present")
    tr.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default fp32); the DMoL loss and KL stay fp32",
    )
    tr.set_defaults(func=cmd_train)

    # Listed for --help; main() hands its arguments to sr_train.fetch_data.
    sub.add_parser("fetch-data", help="build the training set from Debian packages (sr-train fetch-data --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch-data"]:  # its own parser, flags included
        from .fetch_data import main as fetch_main

        return int(fetch_main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import TrainingStopped

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("sr-train: interrupted", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        print(f"sr-train: error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"sr-train: error: missing key {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"sr-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
