"""Uploaded bytes to an RGB image, refusing what is not one, and never decoding a bomb.

Every refusal is a :class:`BadImage` carrying the HTTP status and a one-line message that names
the problem and the fix. Only the formats in :data:`FORMATS` are read (Pillow is given the list,
so no other plugin, such as EPS with its Ghostscript subprocess, ever sees an upload); any other
file is refused as not an image (415). The pixel count, and the memory the image will take
decoded and converted (:mod:`search.serving.budget`), are checked from the header, before any
pixel is decoded; EXIF orientation is applied; grayscale, alpha, palette and 16-bit images are
converted to 8-bit RGB (alpha dropped, as training's decoding dropped it), not refused. Nothing
here touches a file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from search.serving.budget import OverBudget, Reservation, decoded_bytes

__all__ = ["FORMATS", "BadImage", "Decoded", "decode_image"]

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The image formats the server decodes (Pillow's names); README's list."""
_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_STRIP = 1 << 20
"""Pixels per strip when a 16-bit or float image is scaled to 8 bits."""


class BadImage(Exception):
    """An upload that is not a usable image: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Decoded:
    """A decoded upload: the RGB image and what the client may want to know about it."""

    image: Image.Image
    format: str
    width: int
    height: int
    mode: str
    """The mode it was stored in (``L``, ``RGBA``, ``P``, ``I;16``, ...), before conversion to RGB."""
    exif_rotated: bool


def decode_image(
    data: bytes, *, max_pixels: int, draft_size: int | None = None, reservation: Reservation | None = None
) -> Decoded:
    """Decode ``data`` into 8-bit RGB; ``draft_size`` lets a JPEG decode at a reduced scale >= it.

    The memory it will take is taken from ``reservation`` (which may wait for room) before decoding.
    Raises :class:`BadImage` (400 empty, 415 not an image of :data:`FORMATS`, 413 over ``max_pixels`` or
    over the reservation's cap, 422 truncated or corrupt).
    """
    if not data:
        raise BadImage(400, "the upload is empty; send the image's bytes (curl -F image=@photo.jpg)")
    try:  # the header only: the size is checked below, before decoding
        opened = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage(415, f"the upload is not an image this server reads; send a {_NAMES} file") from None
    except Image.DecompressionBombError:  # over twice Pillow's own limit: the size is not even returned
        raise BadImage(
            413, f"the image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels); send a smaller image"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(422, f"the image is corrupt ({_reason(exc)}); send an intact file") from None
    width, height = opened.size
    if width * height > max_pixels or width < 1 or height < 1:
        raise BadImage(
            413,
            f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels / 1e6:.0f} megapixels; send a smaller image",
        )
    fmt, mode = opened.format or "unknown", opened.mode
    try:
        if draft_size is not None and fmt == "JPEG":
            opened.draft("RGB", (draft_size, draft_size))  # as image folders decode for training: fast
        _reserve(reservation, opened.mode, *opened.size, rotated=False)
        opened.load()
        rotated = _orientation(opened) in range(2, 9)  # 1 is upright; anything else is no orientation at all
        if rotated:
            _reserve(reservation, opened.mode, *opened.size, rotated=True)
            ImageOps.exif_transpose(opened, in_place=True)
        rgb = _to_rgb(opened)
    except Image.DecompressionBombError:
        raise BadImage(413, f"the image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(422, f"the image is truncated or corrupt ({_reason(exc)}); send the whole file") from None
    return Decoded(rgb, fmt, width, height, mode, rotated)


def _reserve(reservation: Reservation | None, mode: str, width: int, height: int, *, rotated: bool) -> None:
    """Take the image's decoded bytes (or, ``rotated``, its turned copy's) from ``reservation``."""
    if reservation is None:
        return
    need = decoded_bytes(mode, width, height, rotated=rotated) - (decoded_bytes(mode, width, height) if rotated else 0)
    try:
        reservation.take(need)
    except OverBudget as exc:
        raise BadImage(
            413,
            f"the image is {width}x{height} in mode {mode}: {exc.wanted / 1e6:.0f} MB decoded, over the limit of "
            f"{exc.cap / 1e6:.0f} MB per request; send a smaller (or 8-bit) image (or start serve with a larger "
            "--max-decode-mb)",
        ) from None


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # an unreadable EXIF block is no orientation
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float grayscale scaled (not clipped) to 0..255; alpha and palette as Pillow converts."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        peak = 65535.0 if image.mode != "I" or _maximum(image) > 255 else 255.0
        return _gray_to_rgb(image, lambda v: np.clip(np.rint(v * (255.0 / peak)), 0, 255))
    if image.mode == "F":
        scale = 255.0 if _maximum(image) <= 1.0 else 1.0
        return _gray_to_rgb(image, lambda v: np.clip(np.rint(v * scale), 0, 255))
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. LAB or HSV, which Pillow does not convert to RGB
        raise BadImage(
            415, f"images in pixel mode {image.mode} are not supported; send an RGB or grayscale image"
        ) from None


def _strips(image: Image.Image) -> list[tuple[int, int]]:
    rows = max(1, _STRIP // max(1, image.width))
    return [(top, min(image.height, top + rows)) for top in range(0, image.height, rows)]


def _maximum(image: Image.Image) -> float:
    """The largest pixel value, one strip at a time (no wide copy of the whole image)."""
    peak = 0.0
    for top, bottom in _strips(image):
        peak = max(peak, float(np.asarray(image.crop((0, top, image.width, bottom))).max(initial=0)))
    return peak


def _gray_to_rgb(image: Image.Image, scale: Any) -> Image.Image:
    """8-bit RGB of a one-channel 16-bit or float image: ``scale`` maps each strip's values to 0..255."""
    gray = np.empty((image.height, image.width), dtype=np.uint8)
    for top, bottom in _strips(image):
        gray[top:bottom] = scale(np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64))
    return Image.fromarray(gray).convert("RGB")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
