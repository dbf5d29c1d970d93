"""Uploaded bytes to an RGB image, refusing what is not one, and never decoding a bomb.

Every refusal is a :class:`BadImage` carrying the HTTP status and a one-line message that names
the problem and the fix. The pixel count is checked from the header, before any pixel is decoded;
EXIF orientation is applied; grayscale, alpha, palette and 16-bit images are converted to 8-bit
RGB (alpha dropped, as training's decoding dropped it), not refused. Nothing here touches a file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImage", "Decoded", "decode_image"]

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


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


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Decoded:
    """Decode ``data`` into 8-bit RGB; ``draft_size`` lets a JPEG decode at a reduced scale >= it.

    Raises :class:`BadImage` (400 empty, 415 not an image, 413 over ``max_pixels``, 422 truncated
    or corrupt).
    """
    if not data:
        raise BadImage(400, "the upload is empty; send the image's bytes (curl -F image=@photo.jpg)")
    try:
        opened = Image.open(io.BytesIO(data))  # the header only: the size is checked below, before decoding
    except UnidentifiedImageError:
        raise BadImage(
            415, "the upload is not an image this server can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from None
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
        opened.load()
        rotated = _orientation(opened) not in (None, 1)
        ImageOps.exif_transpose(opened, in_place=True)  # no copy of an image that needs no turn
        rgb = _to_rgb(opened)
    except Image.DecompressionBombError:
        raise BadImage(413, f"the image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(422, f"the image is truncated or corrupt ({_reason(exc)}); send the whole file") from None
    return Decoded(rgb, fmt, width, height, mode, rotated)


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
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 or image.mode != "I" else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. LAB or HSV, which Pillow does not convert to RGB
        raise BadImage(
            415, f"images in pixel mode {image.mode} are not supported; send an RGB or grayscale image"
        ) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
