"""``sr-train``: training and model inspection.

Subcommands: ``info`` (parameter counts and generation cost), ``vdvae-parity``
(compare against an official-VDVAE fixture), ``fetch-data`` (build the
training set), ``train``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts per component and GMAC per output tile")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small-256", help="preset name (default: small-256)")
    src.add_argument("--checkpoint", help="a checkpoint directory instead of a preset")
    info.set_defaults(func=cmd_info)

    parity = sub.add_parser("vdvae-parity", help="worst error per tensor group against an official-VDVAE fixture")
    parity.add_argument("--reference", help="fixture directory (default: $VDVAE_REFERENCE_DIR or ../shared/...)")
    parity.add_argument("--atol", type=float, default=1e-4, help="exit 1 if any error exceeds this")
    parity.set_defaults(func=cmd_vdvae_parity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"sr-train: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
