"""sr-serve's page at `/`: its headers and markup (fast), and a real headless chromium driving it against
the service on the local Ray cluster with the test-double model (slow).

The browser test needs Playwright for Python (the dev extra) and a system chromium (Debian's `chromium`;
Playwright's own browser download is not used): `executable_path` is $SR_CHROMIUM, else the first of
`chromium`, `chromium-browser`, `google-chrome` on PATH. It skips, saying which is missing, without them
(fails where $SR_REQUIRE_BROWSER=1, as in CI).
$SR_PAGE_SCREENSHOT=FILE saves a screenshot of the page with an image loaded.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_cluster.page import page
from sr_runtime import Upscaler

HOST = "127.0.0.1"
BROWSER_TIMEOUT_MS = 120_000  # a loaded 2-core machine: each upscale of the double still takes well under that


def chromium() -> str | None:
    """The chromium to drive: $SR_CHROMIUM, else one on PATH."""
    if os.environ.get("SR_CHROMIUM"):
        return os.environ["SR_CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (the dev extra: pip install playwright)"
    if chromium() is None:
        return "no chromium on PATH (apt-get install chromium, or set $SR_CHROMIUM)"
    return None


MISSING = browser_missing()
#: CI sets this: there a missing browser fails the test instead of skipping it.
REQUIRED = os.environ.get("SR_REQUIRE_BROWSER") == "1"


def test_the_page_allows_only_its_own_inline_code() -> None:
    body, headers = page()
    html = body.decode()
    policy = dict(part.split(" ", 1) for part in headers["Content-Security-Policy"].split("; "))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"].count("'sha256-") == html.count("<script>") == 1
    assert policy["style-src"].count("'sha256-") == html.count("<style>") == 1
    assert "unsafe" not in headers["Content-Security-Policy"]
    # Nothing from elsewhere, no inline handlers or style attributes (the policy would block them).
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in html and "url(" not in html
    assert not re.search(r"\son[a-z]+=", html) and not re.search(r"<[^>]+\sstyle=", html)
    assert headers["X-Content-Type-Options"] == "nosniff"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def page_service(ray_local: Any, double_model: Path) -> Iterator[int]:
    """sr-serve's application at `/` on a free loopback port, one CPU replica of the test double; its port."""
    from ray import serve

    from sr_cluster.serve import Scaling, build_app

    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    try:
        serve.run(build_app(double_model, "cpu", scaling=Scaling(gpus_per_replica=0)), name="sr-page", route_prefix="/")
        yield port
    finally:
        serve.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=MISSING or "")
def test_the_page_upscales_samples_and_downloads(page_service: int, double_model: Path, tmp_path: Path) -> None:
    if MISSING is not None:
        pytest.fail(f"$SR_REQUIRE_BROWSER=1 and {MISSING}")
    from playwright.sync_api import expect, sync_playwright

    # A real photo, 56x48: not square, so swapped axes would show.
    lr = Image.fromarray(np.ascontiguousarray(photo_lr(64)[8:56, 4:60]))
    upload = tmp_path / "astronaut.png"
    lr.save(upload)
    width, height = 4 * lr.width, 4 * lr.height
    problems: list[str] = []  # console errors (CSP violations among them) and uncaught exceptions
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": 1000, "height": 1000}, accept_downloads=True)
            view.set_default_timeout(BROWSER_TIMEOUT_MS)
            view.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            view.on("pageerror", lambda exc: problems.append(str(exc)))
            response = view.goto(f"http://{HOST}:{page_service}/")
            assert response is not None and response.status == 200
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert response.headers["content-security-policy"].startswith("default-src 'none'")
            expect(view.locator("#model")).to_contain_text("test-double")

            body = view.locator("body")  # the page counts finished upscales and std maps on it
            view.set_input_files("#file", str(upload))
            expect(body).to_have_attribute("data-runs", "1", timeout=BROWSER_TIMEOUT_MS)
            assert view.evaluate("[result.naturalWidth, result.naturalHeight]") == [width, height]
            assert view.evaluate("[bicubic.width, bicubic.height]") == [width, height]
            box = view.locator("#compare").bounding_box()
            assert box is not None
            view.mouse.click(box["x"] + 0.25 * box["width"], box["y"] + box["height"] / 2)  # move the split
            assert abs(float(view.input_value("#split")) - 25) < 2
            assert "inset(0px 0px 0px 25" in view.evaluate("result.style.clipPath")

            view.locator("#temperature").fill("0.8")
            expect(body).to_have_attribute("data-runs", "2", timeout=BROWSER_TIMEOUT_MS)
            if os.environ.get("SR_PAGE_SCREENSHOT"):
                view.screenshot(path=os.environ["SR_PAGE_SCREENSHOT"])
            view.locator("#k").fill("3")
            view.click("#draw")
            expect(body).to_have_attribute("data-samples", "3", timeout=BROWSER_TIMEOUT_MS)
            expect(view.locator("#std")).to_be_visible()
            assert view.evaluate("[std.width, std.height]") == [width, height]
            brightest = view.evaluate(
                "Math.max(...std.getContext('2d').getImageData(0, 0, std.width, std.height)"
                ".data.filter((_, i) => i % 4 === 0))"
            )
            assert brightest == 255  # samples at temperature 0.8 differ; scaled to the largest std
            expect(view.locator("#std-note")).to_contain_text("3 samples (temperature 0.8, seeds 0")

            with view.expect_download() as download:
                view.click("#download")
            assert download.value.suggested_filename == "astronaut_x4.png"
            data = Path(download.value.path()).read_bytes()
        finally:
            browser.close()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as got:
        assert got.size == (width, height)
        # What the page asked for: the service's output at temperature 0.8, seed 0.
        with Upscaler(double_model, backend="cpu", temperature=0.8, seed=0) as up:
            assert np.array_equal(np.asarray(got), np.asarray(up.run(lr)))
    assert not problems, problems
