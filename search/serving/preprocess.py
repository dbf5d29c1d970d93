"""An RGB image to a model's input, exactly as the card's ``preprocessing`` record says (no torch).

The steps replay the data set's (:mod:`search.shipping.preprocessing`): the shorter side resized
to the native size and a centre crop (as :mod:`search.data.imagefolder` decodes), enlarged to the
stored size where the data set stores images larger than they come, the evaluation crop, the
resize to the input size (as :mod:`search.data.transforms` does in PyTorch: ``nearest-exact``, or
bilinear with ``align_corners=False``, antialiased when shrinking), then ``(pixel / 255 - mean) / std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from search.data.resize import resize_centre_crop
from search.shipping.preprocessing import PREPROCESSING_VERSION

__all__ = ["MissingPreprocessing", "Preprocessing"]


class MissingPreprocessing(ValueError):
    """A card without a usable ``preprocessing`` record (written by an older export)."""


@dataclass(frozen=True)
class Preprocessing:
    """The card's record, checked."""

    classes: tuple[str, ...]
    input_size: int
    native_size: int
    stored_size: int
    crop: str
    to_input_size: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str = "input"

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Preprocessing:
        record = card.get("preprocessing")
        if not isinstance(record, dict):
            raise MissingPreprocessing(
                "its card has no preprocessing record (class names, input size, resize, "
                "normalisation): it was written by an older export"
            )
        if record.get("version") != PREPROCESSING_VERSION:
            raise MissingPreprocessing(
                f"its card's preprocessing record has version {record.get('version')!r}; "
                f"this server reads version {PREPROCESSING_VERSION}"
            )
        try:
            made = cls(
                classes=tuple(str(c) for c in record["classes"]),
                input_size=int(record["input_size"]),
                native_size=int(record["native_size"]),
                stored_size=int(record["stored_size"]),
                crop=str(record["crop"]),
                to_input_size=str(record["to_input_size"]),
                mean=tuple(float(v) for v in record["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in record["std"]),  # type: ignore[arg-type]
                input_name=str(record.get("input_name", "input")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MissingPreprocessing(f"its card's preprocessing record is incomplete ({exc})") from None
        known = made.to_input_size in ("none", "nearest", "bilinear") and made.crop in ("pad", "resized")
        if not known or len(made.mean) != 3 or len(made.std) != 3:
            raise MissingPreprocessing("its card's preprocessing record is not one this server reads")
        return made

    def native(self, image: Image.Image) -> np.ndarray:
        """uint8 n×n×3 at the native size: shorter side resized (bilinear), centre-cropped."""
        return np.asarray(resize_centre_crop(image, self.native_size).convert("RGB"), dtype=np.uint8)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The model input: float32 1×3×N×N, N the input size."""
        pixels = self.native(image)
        if self.stored_size > self.native_size:  # enlarged once, as stored (CIFAR-10 for full-size inputs)
            enlarged = _resize(pixels.astype(np.float32), self.stored_size, "bilinear")
            pixels = np.clip(np.rint(enlarged), 0, 255).astype(np.uint8)
        side = pixels.shape[0]
        if self.crop == "resized" and side > self.input_size:
            start = (side - self.input_size) // 2
            pixels = pixels[start : start + self.input_size, start : start + self.input_size]
        x = pixels.astype(np.float32) / np.float32(255.0)  # H×W×3 in 0..1
        x = _resize(x, self.input_size, self.to_input_size)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def _resize(x: np.ndarray, size: int, how: str) -> np.ndarray:
    """H×W×3 float32 to size×size×3 the way PyTorch's ``F.interpolate`` did in training."""
    height, width = x.shape[:2]
    if (height, width) == (size, size) or how == "none":
        return x
    if height > size or width > size:  # antialiased bilinear: PyTorch's matches Pillow's filter
        channels = [
            np.asarray(Image.fromarray(x[..., c], mode="F").resize((size, size), Image.Resampling.BILINEAR))
            for c in range(3)
        ]
        return np.stack(channels, axis=-1).astype(np.float32)
    if how == "nearest":  # nearest-exact: the source pixel whose centre is nearest
        rows = np.minimum(((np.arange(size) + 0.5) * (height / size)).astype(np.int64), height - 1)
        cols = np.minimum(((np.arange(size) + 0.5) * (width / size)).astype(np.int64), width - 1)
        return x[rows][:, cols]
    rows0, rows1, row_w = _linear(height, size)
    cols0, cols1, col_w = _linear(width, size)
    x = x[rows0] * (1 - row_w)[:, None, None] + x[rows1] * row_w[:, None, None]
    return (x[:, cols0] * (1 - col_w)[None, :, None] + x[:, cols1] * col_w[None, :, None]).astype(np.float32)


def _linear(source: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of ``align_corners=False`` linear interpolation from ``source`` to ``size``."""
    where = np.maximum((np.arange(size, dtype=np.float32) + 0.5) * np.float32(source / size) - 0.5, 0)
    low = np.minimum(np.floor(where).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (where - low).astype(np.float32)
