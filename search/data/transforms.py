"""How stored uint8 images become model inputs: the same evaluation transform every time, and augmentation.

Two regimes, chosen per data set (:data:`CROPS`):

- ``pad``, for small inputs (CIFAR's 32 px, digits): images are stored at (or below) the input
  size; evaluation resizes the whole image to the input size; training adds a random crop with
  reflect padding of ``input_size // 8`` and, where allowed, a horizontal flip.
- ``resized``, for full-size inputs (:data:`FULL_SIZE` px and up), as torchvision's classification
  references do: images are stored with the shorter side at ``input_size / 0.875`` (256 for 224),
  centre-cropped square; evaluation takes the centre ``input_size`` crop; training takes a random
  resized crop (8%-100% of the area, aspect 3/4-4/3) resized to the input size, and a flip.

Every batch's randomness comes from the generator it is handed, so a seed fixes the augmentation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CROPS", "EVAL_CROP_FRACTION", "FULL_SIZE", "augment", "crop_for", "describe", "stored_size", "to_input"]

CROPS = ("pad", "resized")
FULL_SIZE = 128
"""Input sizes from this many pixels up use the ``resized`` regime (below it, ``pad``)."""
EVAL_CROP_FRACTION = 0.875
"""Evaluation's centre crop as a fraction of the stored side (224 of 256)."""
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def crop_for(input_size: int) -> str:
    """The regime an image folder or CIFAR-10 uses at ``input_size``."""
    return "resized" if input_size >= FULL_SIZE else "pad"


def stored_size(input_size: int, crop: str) -> int:
    """Side at which images are decoded and stored for ``input_size`` under ``crop``."""
    return round(input_size / EVAL_CROP_FRACTION) if crop == "resized" else input_size


def describe(crop: str, input_size: int, flip: bool, upsample: str, stored: int | None) -> dict[str, Any]:
    """The transforms as plain values, for the study, the export card and the data fingerprint."""
    if crop == "resized":
        train = f"random resized crop (scale {SCALE[0]}-{SCALE[1]}, ratio 3/4-4/3) to {input_size}"
        evaluation = f"centre crop {input_size} of {stored}"
    else:
        train = f"random crop {input_size} with reflect padding {input_size // 8}"
        evaluation = f"whole image resized to {input_size} ({upsample})" if stored != input_size else "whole image"
    return {
        "crop": crop,
        "stored_size": stored,
        "input_size": input_size,
        "train": train + (", horizontal flip" if flip else ""),
        "evaluation": evaluation,
    }


def to_input(images: torch.Tensor, size: int, crop: str, upsample: str = "bilinear") -> torch.Tensor:
    """Evaluation transform: uint8 N×3×h×w → float32 N×3×size×size in 0..1, identical on every call."""
    if crop == "resized":
        height, width = images.shape[-2:]
        if height > size and width > size:
            top, left = (height - size) // 2, (width - size) // 2
            images = images[..., top : top + size, left : left + size]
    return _resize(images.float().div_(255.0), size, upsample)


def _resize(x: torch.Tensor, size: int, upsample: str = "bilinear") -> torch.Tensor:
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x.contiguous()
    shrink = height > size or width > size
    if upsample == "nearest" and not shrink:
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def augment(
    images: torch.Tensor, size: int, crop: str, flip: bool, generator: torch.Generator, upsample: str = "bilinear"
) -> torch.Tensor:
    """Training transform: uint8 N×3×h×w → float32 N×3×size×size in 0..1, drawn from ``generator``."""
    if crop == "resized":
        x = torch.stack([_random_resized_crop(image, size, generator) for image in images])
    else:
        x = _pad_crop(_resize(images.float().div_(255.0), size, upsample), generator)
    if flip:
        mirror = torch.rand(len(x), generator=generator) < 0.5
        x[mirror] = x[mirror].flip(-1)
    return x


def _pad_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding of size//8."""
    count, size = x.shape[0], x.shape[-1]
    pad = size // 8
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, top : top + size, left : left + size] for i, (top, left) in enumerate(offsets)])


def _random_resized_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampling (10 tries, then the centre crop) on one uint8 3×h×w image."""
    height, width = image.shape[-2:]
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    box = None
    for _ in range(10):
        draw = torch.rand(2, generator=generator).tolist()
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * draw[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draw[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = (top, left, h, w)
            break
    if box is None:
        side = min(height, width)
        box = ((height - side) // 2, (width - side) // 2, side, side)
    top, left, h, w = box
    patch = image[:, top : top + h, left : left + w].float().div_(255.0).unsqueeze(0)
    return _resize(patch, size)[0]
