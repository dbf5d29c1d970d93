"""What a served model needs to answer correctly, recorded in its card as ``card["preprocessing"]``.

A model's input is more than its size. The data set's images come at a native resolution (the
digits at 8x8, CIFAR-10 at 32x32, an image folder decoded at its stored size), are kept at a
stored size (CIFAR-10 enlarged once for full-size inputs), and evaluation turns them into the
input: a centre crop in the ``resized`` regime, then a resize (``nearest`` for the digits' sharp
pixels, ``bilinear`` otherwise), then normalisation. :mod:`search.serving.preprocess` replays
exactly these steps on an uploaded image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model server imports PREPROCESSING_VERSION without torch
    from search.data.dataset import Dataset

__all__ = ["PREPROCESSING_VERSION", "preprocessing_record"]

PREPROCESSING_VERSION = 1
"""Bumped when the meaning of a field changes; a server refuses a record it does not know."""

_NATIVE_SIZE = {"cifar10": 32}
"""Sources whose images have a fixed native side (enlarged once to the stored size for full-size inputs)."""


def preprocessing_record(data: Dataset) -> dict[str, Any]:
    """The steps from an RGB image to the model's input, as plain values (JSON)."""
    height, width = (int(v) for v in data.train.images.shape[-2:])
    if height != width:
        raise ValueError(f"data set {data.name} stores {width}x{height} images; square images are expected")
    crop = data.crop
    size = int(data.input_size)
    cropped = size if crop == "resized" and height > size else height
    return {
        "version": PREPROCESSING_VERSION,
        "classes": list(data.classes),
        "native_size": _NATIVE_SIZE.get(data.name, height),
        "stored_size": height,
        "crop": crop,
        "input_size": size,
        "to_input_size": _to_input_size(cropped, size, data.upsample),
        "steps": [
            "shorter side to native_size (PIL bilinear), centre crop native_size square, 8-bit RGB",
            "to stored_size if larger (bilinear, align_corners=False, rounded to 8 bits)",
            "crop 'resized': centre crop input_size of stored_size",
            "to input_size by to_input_size (none, nearest-exact, or bilinear antialiased when shrinking)",
            "pixel / 255, minus mean, divided by std, per RGB channel; NCHW float32",
        ],
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "input_name": "input",
    }


def _to_input_size(side: int, size: int, upsample: str) -> str:
    """How evaluation brings a ``side`` px image to the input size (:mod:`search.data.transforms`)."""
    if side == size:
        return "none"
    return "nearest" if upsample == "nearest" and side < size else "bilinear"
