"""sr-serve's HTTP side: query parameters, body reading under size, deadline and rate limits, image
decoding and encoding, and one-line JSON errors. No Ray here: only Starlette's request and responses.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from sr_runtime.jobs import encode

#: Body formats the service decodes (Pillow format name -> media type).
INPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
#: Content-Types a request may declare; anything else is a 415 (the bytes decide the format).
ACCEPTED_CONTENT_TYPES = frozenset([*INPUT_FORMATS.values(), "application/octet-stream"])
#: `format` query values -> (Pillow format, media type); encoded as `sr-upscale` writes them (sr_runtime.jobs.encode).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
#: Above this the model's samples drift off the image manifold; the range keeps requests sane.
MAX_TEMPERATURE = 2.0
#: Seeds are numpy Generator seeds; the bound keeps them one signed 64-bit word.
SEED_LIMIT = 2**63
QUERY_PARAMETERS = ("temperature", "seed", "format")


class HTTPError(Exception):
    """A request answered with `status` and a one-line `message` (extra `headers` e.g. Allow)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class UpscaleParams:
    """The query of one request: temperature, seed (ignored at temperature 0) and output format."""

    temperature: float = 0.0
    seed: int = 0
    format: str | None = None  # None: the format of the body


def quoted(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut at `limit` characters: errors stay one short line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_params(items: Sequence[tuple[str, str]]) -> UpscaleParams:
    """The request's query parameters, each checked; HTTPError 400 names the first bad one."""
    seen: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_PARAMETERS:
            raise HTTPError(400, f"unknown query parameter {quoted(key)} (use {', '.join(QUERY_PARAMETERS)})")
        if key in seen:
            raise HTTPError(400, f"query parameter {quoted(key)} given twice")
        seen[key] = value
    temperature = 0.0
    if "temperature" in seen:
        try:  # ASCII only: float() also reads other scripts' digits and surrounding spaces
            temperature = float(seen["temperature"]) if seen["temperature"].isascii() else math.nan
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise HTTPError(
                400, f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {quoted(seen['temperature'])}"
            )
    seed = 0
    if "seed" in seen:
        text = seen["seed"]
        # Length first: int() refuses strings over 4300 digits with a ValueError of its own.
        if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) >= SEED_LIMIT:
            raise HTTPError(400, f"seed must be an integer in [0, 2**63), got {quoted(text)}")
        seed = int(text)
    fmt = seen.get("format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise HTTPError(400, f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {quoted(fmt)}")
    return UpscaleParams(temperature, seed if temperature > 0 else 0, fmt)


def decode_body(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The decoded image and its format name (lower case); the size is checked before decoding.

    Pillow reads the size from the header, so a small file declaring a huge
    raster (a decompression bomb) is refused before any pixel is allocated.
    """
    try:
        with Image.open(io.BytesIO(data), formats=tuple(INPUT_FORMATS)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise HTTPError(
                    413,
                    f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over this "
                    f"service's limit of {max_pixels / 1e6:.1f} MP",
                )
            img.load()
            # A multi-picture JPEG (MPO, as phones write) is its first picture, a JPEG: answered as one.
            return img, "jpeg" if img.format == "MPO" else str(img.format).lower()
    except HTTPError:
        raise
    except UnidentifiedImageError:
        raise HTTPError(400, "body is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise HTTPError(413, "image refused as a decompression bomb (too many pixels)") from None
    except MemoryError:
        raise HTTPError(413, "image too large to decode") from None
    except Exception as exc:  # noqa: BLE001 -- a decoder's error on hostile bytes is this request's fault
        raise HTTPError(400, f"truncated or corrupt image ({type(exc).__name__}: {exc})") from None


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """`img` saved as `fmt` the way `sr-upscale` saves files (modes the format lacks converted)."""
    return encode(img, OUTPUT_FORMATS[fmt][0])


@dataclass(frozen=True)
class UploadLimits:
    """How big and how slow a body may be: over `max_bytes` is a 413, too slow a 408.

    The whole body must arrive within `timeout_s`, and never fall more than
    `grace_s` behind `min_bytes_per_s`: a client that stalls or trickles is
    answered within seconds instead of holding its connection for the deadline.
    """

    max_bytes: int
    timeout_s: float
    min_bytes_per_s: float
    grace_s: float


async def read_body(request: Request, limits: UploadLimits) -> bytes:
    """The request body, refused with 413 as soon as its declared or received size passes the limit,
    and with 408 when it does not arrive within the deadline or at the minimum rate."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise HTTPError(400, f"bad Content-Length {quoted(declared)}")
        if len(declared) > 18 or int(declared) > limits.max_bytes:
            raise HTTPError(
                413, f"body of {declared[:40]} bytes is over this service's limit of {limits.max_bytes} bytes"
            )
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        deadline = start + limits.timeout_s
        behind = start + limits.grace_s + len(body) / limits.min_bytes_per_s  # when the rate is missed
        wait = min(deadline, behind) - loop.time()
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            if deadline <= behind:
                reason = f"body not received within {limits.timeout_s:g} s"
            else:
                reason = f"body arriving slower than {limits.min_bytes_per_s:g} bytes/s"
            raise HTTPError(
                408, f"{reason} ({len(body)} bytes in {loop.time() - start:.1f} s)", {"Connection": "close"}
            ) from None
        except ClientDisconnect:
            raise HTTPError(400, "the client closed the connection before the body was in") from None
        body += chunk
        if len(body) > limits.max_bytes:
            raise HTTPError(413, f"body is over this service's limit of {limits.max_bytes} bytes")
    if not body:
        raise HTTPError(400, "empty body: send the image's bytes")
    return bytes(body)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
