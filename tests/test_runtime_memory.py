"""Peak memory of a run per output pixel, measured in fresh processes against the documented figure."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime.upscaler import BYTES_PER_OUTPUT_PIXEL, BYTES_PER_OUTPUT_PIXEL_SAMPLES

REPO = Path(__file__).resolve().parents[1]
CLEAR_REFS = Path("/proc/self/clear_refs")

# One file through the Upscaler as sr-upscale runs it, after the session is warm; prints the peak RSS
# growth (VmHWM, reset after the warm-up) and the output pixels.
_RUN = """
import json, sys
from pathlib import Path
import numpy as np
from sr_runtime import Upscaler
from sr_runtime.jobs import UpscaleOptions, upscale_file

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

model, src, dest, samples = *sys.argv[1:4], int(sys.argv[4])
up = Upscaler(model, backend="cpu", temperature=0.0 if samples == 1 else 0.5)
for _ in range(3):
    up.run(np.zeros((120, 120, 3), np.uint8))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
options = UpscaleOptions(output=dest, quiet=True, samples=samples, std_map=samples > 1)
targets = (Path(dest), Path(dest).with_name("std.png")) if samples > 1 else (Path(dest),)
upscale_file(up, Path(src), targets, options)
print(json.dumps({"grew": status("VmHWM") - before, "after": status("VmRSS") - before}))
"""


def _peak_growth(model: Path, src: Path, dest: Path, samples: int = 1) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(model), str(src), str(dest), str(samples)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize(("samples", "documented"), [(1, BYTES_PER_OUTPUT_PIXEL), (4, BYTES_PER_OUTPUT_PIXEL_SAMPLES)])
def test_peak_memory_per_output_pixel_stays_under_the_documented_figure(
    double_model: Path, tmp_path: Path, samples: int, documented: int
) -> None:
    """The slope of the peak over two image sizes: what each output pixel costs, session and fixed parts aside.

    Before rows were blended in bands and converted in strips, one sample took 36 bytes (31 documented).
    """
    sizes = (300, 700)  # LR sides: 1.4 and 7.8 MP out
    growth, pixels = [], []
    for side in sizes:
        src = tmp_path / f"in{side}.png"
        Image.fromarray(np.asarray(Image.fromarray(photo_lr(512)).resize((side, side)))).save(src)
        growth.append(_peak_growth(double_model, src, tmp_path / f"out{side}.png", samples)["grew"])
        pixels.append(16 * side * side)
    per_pixel = (growth[1] - growth[0]) / (pixels[1] - pixels[0])
    assert per_pixel <= documented, f"{per_pixel:.1f} bytes per output pixel"


# Frees 63 of every 64 heap blocks of 4 KB (200 MB in all): the survivors keep the heap from shrinking by
# itself, so only a trim hands the free pages back. Prints the RSS it gave back.
_FRAGMENT = """
from sr_runtime.memory import release_free_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

blocks = [bytearray(4096) for _ in range(50_000)]
survivors = blocks[::64]
del blocks
before = rss()
assert release_free_memory()
print(before - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's; elsewhere nothing is trimmed")
def test_release_free_memory_gives_a_fragmented_heap_back() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FRAGMENT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) > 100e6  # of ~200 MB freed
