"""Markdown tables from the benchmark JSON (the JSON is the record; these are for reading), and the
small helpers every benchmark module shares: progress lines, list flags, writing a result."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the result)."""
    print(msg, file=sys.stderr, flush=True)


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers ("1,4,16")."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text}")
    return values


def write_result(json_path: Path, result: dict[str, Any], markdown: str) -> Path:
    """The JSON record and its markdown page side by side (`X.json`, `X.md`); returns the page's path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown)
    return md_path


def slug(text: str) -> str:
    """`text` as a file-name part: lower case, each run of other characters one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def save_result(out: Path, stem: str, result: dict[str, Any], markdown: str) -> Path:
    """`write_result` as `out/stem.json` + `.md`, the page printed and the paths logged; returns the page's path."""
    page = write_result(out / f"{stem}.json", result, markdown)
    print(markdown)
    log(f"wrote {out / stem}.json and {page}")
    return page


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _versions(v: dict[str, Any]) -> str:
    keys = ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy", "python")
    return ", ".join(f"{k} {v.get(k) or 'absent'}" for k in keys)


def tile_table(rows: list[dict[str, Any]]) -> str:
    """One line per backend x batch: latency percentiles, throughput, FLOP/s, memory, speed-up."""
    head = (
        "| device | backend | precision | batch | n | p50 ms | p90 ms | p99 ms | CPU ms p50 | ms/tile "
        "| out MP/s | GFLOP/s | % of peak | vs PyTorch FP32 | +RSS MiB | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lat = r["latency"]
        frac = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
        speed = r.get("speedup_vs_pytorch_fp32")
        lines.append(
            f"| {r['device']} | {r['backend']} | {r['precision']} | {r['batch']} | {lat['n']} "
            f"| {_f(lat['p50_ms'])} | {_f(lat['p90_ms'])} | {_f(lat['p99_ms'])} | {_f(r['cpu_time']['p50_ms'])} "
            f"| {_f(r['per_tile_p50_ms'])} "
            f"| {_f(r['throughput_mpix_s'], '.3f')} | {_f(r['gflops'])} | {_f(frac)} "
            f"| {'-' if speed is None else f'{speed:.2f}x'} | {_f(r['memory']['added_rss_mb'], '.0f')} "
            f"| {_f(r['memory']['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def image_table(rows: list[dict[str, Any]]) -> str:
    """One line per runtime backend x batch: whole-image wall time and the share outside the backend."""
    head = (
        "| device | backend | precision | resolution | batch | tiles | load s | first s | n | p50 s | p90 s "
        "| out MP/s | outside backend | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lat = r["latency"]
        lines.append(
            f"| {r['device']} | {r['backend']} | {r['precision']} | {r['resolution']} | {r['batch']} | {r['tiles']} "
            f"| {r['load_s']:.2f} | {r['first_call_ms'] / 1e3:.3f} | {lat['n']} "
            f"| {lat['p50_ms'] / 1e3:.3f} | {lat['p90_ms'] / 1e3:.3f} | {r['throughput_mpix_s']:.3f} "
            f"| {100 * r['outside_backend_share']:.1f}% | {_f(r['memory']['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def latency_markdown(result: dict[str, Any]) -> str:
    """The whole result of one model as a readable page."""
    m, host = result["model"], result["host"]
    tiles = [r for r in result["rows"] if r["kind"] == "tile"]
    images = [r for r in result["rows"] if r["kind"] == "image"]
    out = [
        f"# Latency: {m['config']} ({m['resolution']}), {result['created_utc']}",
        "",
        (
            f"- model: `{m['key']}` = {m['config']}, weights: {m['weights']}; {m['gmac_per_tile']:.3f} GMAC "
            f"per tile (torch FLOP counter), {m['generation_params']:,} generation-path params"
        ),
        (
            f"- host: {host['cpu']} ({host['usable_cpus']} usable cores, torch threads {host['torch_threads']}); "
            f"GPUs: {', '.join(host['gpus']) or 'none'}; load average {host['load_average_at_start']} at start, "
            f"{host['load_average_at_end']} at end (other jobs share this machine: compare ratios within one table)"
        ),
        f"- versions: {_versions(result['versions'])}",
        f"- mode: {result['mode']}; temperature 0; `{' '.join(result['command'])}`",
        f"- ONNX Runtime vs PyTorch on one tile (same weights check): {m['parity_vs_pytorch']}",
    ]
    for name, p in result["peaks"].items():
        out.append(
            f"- measured peak {name}: {p['gflops']:.1f} GFLOP/s (median {p['gflops_median']:.1f}; {p['method']})"
        )
    out += ["", "## Per tile", "", tile_table(tiles) if tiles else "(no backend ran)", ""]
    out.append(
        "CPU ms = process CPU time per call, all threads (less sensitive to other jobs than wall time; "
        "counts spin-waiting threads); ms/tile = p50 / batch; out MP/s = output megapixels per second at p50; "
        "GFLOP/s = 2 x GMAC x batch / p50; % of peak against the measured peak above "
        "(CPU rows against the fp32 peak); +RSS = resident memory the backend's creation and warm-up added "
        "(PyTorch rows: the module already existed, so "
        "activations only; memory an earlier step freed and this one reused shows as 0); peak RSS = the "
        "whole process then, including models measured earlier in the same run. Backends were timed round-robin "
        "(interleaved), so load changes during the run hit all of them alike."
    )
    if images:
        out += [
            "",
            "## Whole image through `Upscaler`",
            "",
            image_table(images),
            "",
            (
                "load s = Upscaler() (a GPU backend's per-shape warm-up included); first s = the first image "
                "after load, outside the steady-state p50/p90; outside backend = 1 - (time inside backend.run) / "
                "wall time: tiling, blending, conversions."
            ),
        ]
    notes = sorted({n for r in result["rows"] for n in r["notes"]})
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if result["skipped"]:
        out += ["", "## Not measured", ""]
        out += [f"- {s['backend']} ({s['what']}): {s['reason']}" for s in result["skipped"]]
    return "\n".join(out) + "\n"
