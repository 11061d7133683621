"""Image decoding to one float layout and encoding back to what the caller gave.

Every input (path, PIL image of any common mode, uint8/uint16/float array) is
turned into float32 RGB planes in [0, 1] plus an optional alpha plane, and a
`Layout` that remembers how to rebuild the caller's kind of image: grayscale
stays grayscale, 16-bit grey stays 16-bit, alpha is kept. Pillow reads 48/64-bit
colour at 8 bits per channel; that, and animated files (first frame only), are
logged as warnings naming the file.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from sr_runtime.errors import SRInputError

#: Default limit on input pixels (width x height): refuses decompression bombs.
DEFAULT_MAX_PIXELS = 64_000_000
#: The raster formats untrusted files may be decoded as. Pillow's other plugins
#: include EPS (runs Ghostscript) and formats nobody upscales; a file's name
#: never widens this list, its bytes are matched against these plugins only.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA")

log = logging.getLogger("sr_runtime")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: PIL modes decoded by converting to a mode we handle; the value is that mode.
_CONVERT = {
    "1": "L",
    "La": "LA",
    "PA": "RGBA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}


@dataclass(frozen=True)
class Layout:
    """How to rebuild the caller's kind of image from float planes."""

    as_array: bool
    dtype: np.dtype
    gray: bool
    alpha: bool
    squeeze: bool = False
    pil_mode: str | None = None


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray
    alpha: np.ndarray | None
    layout: Layout

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[2]


def open_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, with EXIF orientation applied; SRInputError if unusable.

    Any exception a decoder raises becomes an SRInputError naming the file:
    plugins raise ValueError, SyntaxError, struct.error... on hostile bytes,
    and one bad input must never abort a batch.
    """
    p = Path(path)
    if p.is_dir():
        raise SRInputError(f"{p}: is a directory, not an image file")
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise SRInputError(f"{p}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SRInputError(f"{p}: symlink loop") from None
        raise SRInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return _decode_file(p, size, str(p), max_pixels)


def open_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_image` for an encoded image held in memory (standard input); errors name it `name`."""
    return _decode_file(io.BytesIO(data), len(data), name, max_pixels)


def _decode_file(source: Path | io.BytesIO, size: int, name: str, max_pixels: int) -> Image.Image:
    p = name
    if size == 0:
        raise SRInputError(f"{p}: empty file (0 bytes)")
    try:
        with Image.open(source, formats=RASTER_FORMATS) as img:
            _check_pixels(img.size, max_pixels, p)
            _warn_about_lost_content(img, p)
            grey_alpha_16 = img.mode == "RGBA" and any(r.startswith("LA;16") for r in _rawmodes(img))
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise SRInputError(f"{p}: truncated or corrupt image ({exc})") from None
            _check_jpeg_data(img, size, p)
            _check_exif(img, p)
            out = ImageOps.exif_transpose(img)
            return out.convert("LA") if grey_alpha_16 else out  # Pillow reads 16-bit grey+alpha as RGBA
    except SRInputError:
        raise
    except UnidentifiedImageError:
        raise SRInputError(f"{p}: not an image (or not one of {', '.join(RASTER_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise SRInputError(f"{p}: refused as a decompression bomb (too many pixels for Pillow)") from None
    except MemoryError:
        raise SRInputError(f"{p}: not enough memory to decode it") from None
    except OSError as exc:  # permissions, I/O errors; decoders raise it without an errno
        if exc.errno is None:
            raise SRInputError(f"{p}: truncated or corrupt image ({exc})") from None
        raise SRInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 -- a decoder's error on hostile bytes is this input's failure
        raise SRInputError(f"{p}: corrupt image ({type(exc).__name__}: {exc})") from None


def _rawmodes(img: Image.Image) -> list[str]:
    """The decoder's raw modes (e.g. "LA;16B"), known before `load()` only."""
    tiles = img.tile if isinstance(img, ImageFile.ImageFile) else []
    return [str(t[3] if isinstance(t[3], str) else t[3][0]) for t in tiles if t[3]]


def _warn_about_lost_content(img: Image.Image, path: str) -> None:
    """Say so when only part of a file is upscaled: animation frames, colour bits beyond 8."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        log.warning("%s: %d frames: only the first is upscaled", path, frames)
    rawmodes = _rawmodes(img)
    if img.mode in ("RGB", "RGBA") and any(r.startswith("LA;16") for r in rawmodes):
        log.warning("%s: 16-bit grey+alpha is read at 8 bits per channel (Pillow's limit)", path)
    elif img.mode in ("RGB", "RGBA") and any(";16" in r for r in rawmodes):
        log.warning("%s: 16-bit colour is read at 8 bits per channel (Pillow's limit; 16-bit grey is kept)", path)


def _check_jpeg_data(img: Image.Image, size: int, path: str) -> None:
    """Refuse a JPEG whose header claims far more pixels than its data can hold.

    libjpeg fills what the data does not cover with flat grey and only warns.
    A Huffman-coded scan spends at least one bit per 8x8 luma block (its DC
    code), so fewer than one bit per two blocks cannot be a whole image.
    """
    if img.format != "JPEG":
        return
    blocks = math.ceil(img.size[0] / 8) * math.ceil(img.size[1] / 8)
    if size * 8 * 2 < blocks:
        raise SRInputError(
            f"{path}: the JPEG header says {img.size[0]}x{img.size[1]} but the file has only {size} "
            "bytes, too few for that many pixels (truncated or forged)"
        )


def _check_exif(img: Image.Image, path: str) -> None:
    """EXIF that does not parse is refused whatever the format (Pillow ignores some of it for JPEG only)."""
    data = img.info.get("exif")
    if not data:
        return
    try:
        Image.Exif().load(data)
    except Exception as exc:  # noqa: BLE001 -- the TIFF parser raises anything on hostile bytes
        raise SRInputError(f"{path}: corrupt EXIF data ({type(exc).__name__}: {exc})") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise SRInputError(
            f"{what}: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the pixel limit of {max_pixels / 1e6:.1f} MP "
            "(decompression bomb and memory guard; raise max_pixels / --max-pixels to allow it)"
        )
    if w == 0 or h == 0:
        raise SRInputError(f"{what}: image has no pixels ({w}x{h})")


def decode_pil(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Float planes of a PIL image (EXIF orientation applied); the layout rebuilds the same mode."""
    _check_pixels(img.size, max_pixels, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 -- EXIF is parsed lazily, by plugins that raise anything
        raise SRInputError(f"corrupt EXIF data ({type(exc).__name__}: {exc})") from None
    source_mode = img.mode
    if source_mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif source_mode in _CONVERT:
        img = img.convert(_CONVERT[source_mode])
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise SRInputError("mode 'I' image has values outside 0..65535 (only 16-bit data is supported)")
        planes = _decode_array(arr.astype(np.uint16), "image")
        return Decoded(planes.rgb, None, Layout(False, np.dtype(np.uint16), True, False, pil_mode="I;16"))
    if mode == "F":
        planes = _decode_array(np.asarray(img, np.float32), "mode 'F' image")
        return Decoded(planes.rgb, None, Layout(False, np.dtype(np.float32), True, False, pil_mode="F"))
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise SRInputError(f"unsupported PIL image mode {mode!r}")
    planes = _decode_array(np.asarray(img), "image")
    out_mode = "CMYK" if source_mode == "CMYK" else None
    layout = Layout(False, np.dtype(np.uint8), mode in ("L", "LA"), mode in ("LA", "RGBA"), pil_mode=out_mode)
    return Decoded(planes.rgb, planes.alpha, layout)


def decode_array(arr: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Float planes of an HxW / HxWxC (C in 1..4) uint8, uint16 or float [0, 1] array."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise SRInputError(f"array must be HxW or HxWxC with C in 1..4, got shape {arr.shape}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, "array")
    return _decode_array(arr, "array")


def _decode_array(arr: np.ndarray, what: str) -> Decoded:
    if arr.dtype == np.uint8:
        planes = arr.astype(np.float32) * np.float32(1 / 255)
    elif arr.dtype == np.uint16:
        planes = arr.astype(np.float32) * np.float32(1 / 65535)
    elif arr.dtype in (np.float16, np.float32, np.float64):
        planes = arr.astype(np.float32)
        if not np.isfinite(planes).all():
            raise SRInputError(f"{what} contains NaN or Inf values")
        lo, hi = float(planes.min()), float(planes.max())
        if lo < 0.0 or hi > 1.0:
            raise SRInputError(f"float {what} must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    else:
        raise SRInputError(f"{what} dtype {arr.dtype} is not supported (use uint8, uint16 or float in [0, 1])")
    squeeze = planes.ndim == 2
    hwc = planes[:, :, None] if squeeze else planes
    channels = hwc.shape[2]
    gray = channels in (1, 2)
    alpha = np.ascontiguousarray(hwc[:, :, channels - 1]) if channels in (2, 4) else None
    color = hwc[:, :, :1] if gray else hwc[:, :, :3]
    rgb = np.ascontiguousarray(np.broadcast_to(color.transpose(2, 0, 1), (3, *hwc.shape[:2])))
    return Decoded(rgb, alpha, Layout(True, arr.dtype, gray, alpha is not None, squeeze=squeeze))


#: Output rows converted at a time: the float temporaries of a conversion stay a few MB at any image size.
STRIP_ROWS = 64


class ImageBuilder:
    """The caller's kind of image, filled band by band from float RGB rows in [0, 1].

    Only the result is image-sized, in its own type (a PIL image, or an array
    of the layout's dtype); the float temporaries of the conversion, and the
    bicubic upscale of the alpha plane, are made STRIP_ROWS rows at a time.
    """

    def __init__(self, layout: Layout, size: tuple[int, int], alpha: np.ndarray | None = None, scale: int = 1) -> None:
        """`size` is the output's (height, width); `alpha` the input's alpha plane, `scale` times smaller."""
        self.layout = layout
        self.size = size
        self._scale = scale
        self._alpha = None if alpha is None else Image.fromarray(alpha.astype(np.float32), mode="F")
        channels = (1 if layout.gray else 3) + (alpha is not None)
        self._pixels = np.empty((*size, channels), layout.dtype) if layout.as_array else None
        self._image: Image.Image | None = None

    def write(self, y0: int, rgb: np.ndarray) -> None:
        """Rows `y0 .. y0 + n - 1` of the output from float planes `[3, n, W]` (read, never kept)."""
        for start in range(0, rgb.shape[1], STRIP_ROWS):
            strip = rgb[:, start : start + STRIP_ROWS]
            self._put(y0 + start, self._convert(y0 + start, strip))

    def _convert(self, y0: int, rgb: np.ndarray) -> np.ndarray:
        """One strip as [n, W, C] in the layout's dtype: grey averaged, alpha beside it, integers rounded."""
        layout = self.layout
        color = rgb.mean(axis=0, keepdims=True) if layout.gray else rgb
        planes = color if self._alpha is None else np.concatenate([color, self._alpha_rows(y0, rgb.shape[1])])
        if layout.dtype in (np.uint8, np.uint16):
            # Scale and round channel-first (contiguous), transpose only the small integer result.
            scaled = planes * np.float32(255 if layout.dtype == np.uint8 else 65535)
            np.rint(scaled, out=scaled)
            chw = scaled.astype(layout.dtype)
        else:
            chw = planes.astype(layout.dtype)
        return np.ascontiguousarray(chw.transpose(1, 2, 0))

    def _alpha_rows(self, y0: int, rows: int) -> np.ndarray:
        """Output rows of the alpha plane, bicubic: transparency is not what the SR model was trained on.

        Resizing a box of the plane reads the filter's support beyond the box,
        so strips equal the same rows of one whole-plane resize.
        """
        assert self._alpha is not None
        s, width = self._scale, self.size[1]
        box = (0.0, y0 / s, self._alpha.width, (y0 + rows) / s)
        up = self._alpha.resize((width, rows), Image.Resampling.BICUBIC, box=box)
        return np.clip(np.asarray(up, np.float32), 0.0, 1.0)[None]

    def _put(self, y0: int, hwc: np.ndarray) -> None:
        if self._pixels is not None:
            self._pixels[y0 : y0 + hwc.shape[0]] = hwc
            return
        strip = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
        if self._image is None:  # the strip's mode is the image's: allocated once, uninitialised (all rows come)
            self._image = Image.new(strip.mode, (self.size[1], self.size[0]), None)
        self._image.paste(strip, (0, y0))

    def image(self) -> Image.Image | np.ndarray:
        """The finished image: an array shaped like the input's, or a PIL image in the input's mode."""
        layout = self.layout
        if self._pixels is not None:
            return self._pixels[:, :, 0] if layout.squeeze else self._pixels
        if self._image is None:
            raise ValueError("no rows were written")
        img = self._image
        return img.convert(layout.pil_mode) if layout.pil_mode not in (None, img.mode) else img


def encode(
    rgb: np.ndarray, layout: Layout, alpha: np.ndarray | None = None, scale: int = 1
) -> Image.Image | np.ndarray:
    """The caller's kind of image from float [3, H, W] planes in [0, 1] (and its alpha plane, `scale` x smaller)."""
    builder = ImageBuilder(layout, (rgb.shape[1], rgb.shape[2]), alpha, scale)
    builder.write(0, rgb)
    return builder.image()
