"""Training runs side by side at the same steps, from their ``log.csv``.

Runs started with the same seed and data read the same batches at the same
step, so their per-step distortions compare directly: a run whose latents the
decoder reads pays less distortion on the same crops. Prints the mean of each
column over windows of logged steps.

Usage: python scripts/compare_logs.py RUN_DIR_OR_CSV... [--window 10] [--columns distortion,rate,rate/256]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_log(path: Path) -> dict[int, dict[str, str]]:
    csv_path = path / "log.csv" if path.is_dir() else path
    with csv_path.open(newline="") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--window", type=int, default=10, help="logged rows per printed row (default 10)")
    p.add_argument("--columns", default="distortion,rate,rate/256")
    args = p.parse_args()
    logs = [read_log(r) for r in args.runs]
    columns = args.columns.split(",")
    steps = sorted(set.intersection(*(set(log) for log in logs)))
    names = [r.name if r.is_dir() else r.parent.name for r in args.runs]
    print("step | " + " | ".join(f"{n}: {' '.join(columns)}" for n in names))
    for lo in range(0, len(steps), args.window):
        window = steps[lo : lo + args.window]
        cells = []
        for log in logs:
            means = [sum(float(log[s][c]) for s in window) / len(window) for c in columns]
            cells.append(" ".join(f"{m:.4f}" for m in means))
        print(f"{window[-1]} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
