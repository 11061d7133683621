"""`scripts/gpu_check.sh` in its dry run (every stage on the CPU at tiny sizes): the script a lent GPU gets
must work the first time, so every stage is run here and must write its result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Stages and what each must leave under $OUT (the install stage runs only with SR_GPU_PACK=1).
STAGES = {
    "environment": None,
    "pytest_gpu": "pytest_gpu.xml",
    "frames_fp16": "benchmarks/results/frames-dry-run-cpu-frames-fp16-",
    "frames_fp16_nhwc": "benchmarks/results/frames-dry-run-cpu-frames-fp16-nhwc-",
    "frames_fp32": "benchmarks/results/frames-dry-run-cpu-frames-fp32-",
    "serve": "benchmarks/results/cluster-serve-dry-run-cpu-",
    "ray_batch": "benchmarks/results/cluster-batch-dry-run-cpu-",
}


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_every_result(tmp_path: Path, double_model: Path) -> None:
    pytest.importorskip("ray", reason="the serve and ray_batch stages need Ray (the cluster extra)")
    out = tmp_path / "gpu_check"
    env = {
        **os.environ,
        "GPU_CHECK_DRY": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "FIXED_MODEL": str(double_model),  # a fixed-size model's tiled path beside the frames
        # Minutes on an idle 2-core machine; far more where it is shared: generous limits, no figure matters.
        "GPU_CHECK_BUDGET_S": "4800",
        "GPU_CHECK_STAGE_S": "1200",
    }
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=5400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == set(STAGES)
    for name, prefix in STAGES.items():
        step = steps[name]
        log = (out / step["log"]).read_text()[-2000:]
        assert step["ok"], f"{name}: exit {step['exit_status']}, results {step['results']}\n{log}"
        if prefix is not None:
            assert any(r.startswith(prefix) for r in step["results"]), (name, step["results"])
    frames = [r for path, r in summary["results"].items() if "/frames-" in path]
    assert len(frames) == 3
    for result in frames:
        assert result["gmac_per_frame"] > 0 and result["peak"]["gflops"] > 0 and result["stream_fps"] > 0
    assert sorted(r["precision_used"] for r in frames) == ["fp16", "fp16", "fp32"]  # as asked, also on the CPU
    assert sum("fixed_model" in r and "torch" in r for r in frames) == 2
    page = (out / "gpu_check.md").read_text()
    assert "dry run" in page and page.count("# Whole frames vs tiles") == 3
    for name in STAGES:
        assert f"| {name} | 0 |" in page
