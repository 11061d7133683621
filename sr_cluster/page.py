"""The page `sr-serve` shows at `/`: one static HTML file with its CSS and JS inline (`page.html`, package
data), no external assets and no build step. It talks to the service only through `POST upscale` and
`GET healthz`, relative to its own address, so it works under any route prefix.

The Content-Security-Policy allows exactly the page's own inline `<script>` and `<style>` blocks (by
their SHA-256, computed here from the shipped file), fetches to its own origin, and images from `blob:`
(the service's answers) and `data:` (the empty favicon); nothing else loads or runs. No Ray here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

PAGE_FILE = "page.html"


def _hashes(html: str, tag: str) -> str:
    """CSP source expressions for the inline `<tag>` blocks of `html` ('none' if it has none)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = [base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks]
    return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"


def content_security_policy(html: str) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "img-src blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its response headers except Content-Type (text/html; charset=utf-8)."""
    html = resources.files("sr_cluster").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return html.encode("utf-8"), headers
