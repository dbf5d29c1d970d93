"""What data a user asked for, and the per-source defaults, as plain values.

Light to import: the CLI parses it before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_INPUT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSpec",
    "Triple",
    "input_size",
    "normalisation",
]

Triple = tuple[float, float, float]

IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
CIFAR10_MEAN: Triple = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Triple = (0.2470, 0.2435, 0.2616)

DEFAULT_INPUT_SIZE = {"digits": 224, "imagefolder": 224, "cifar10": 32}
"""Side of the square model input per source kind when the spec gives none."""


@dataclass(frozen=True)
class DataSpec:
    """What the user asked for; :func:`load_dataset` turns it into a :class:`Dataset`."""

    source: str
    """``"digits"``, ``"imagefolder:PATH"``, ``"cifar10"`` (downloaded once) or ``"cifar10:PATH"``."""
    input_size: int | None = None
    """Side of the square model input; ``None`` means the source's default."""
    mean: Triple | None = None
    """Per-channel normalisation mean (0..1 scale); ``None`` means the source's default."""
    std: Triple | None = None
    """Per-channel normalisation std (0..1 scale); ``None`` means the source's default."""
    val_fraction: float = 0.1
    """Share of each class held out for validation when the source has no val split."""
    seed: int = 0
    """Seed of the deterministic splits."""


def normalisation(spec: DataSpec, mean: Triple, std: Triple) -> tuple[Triple, Triple]:
    """The spec's mean/std where given, else the source defaults."""
    chosen_mean = tuple(float(v) for v in spec.mean) if spec.mean is not None else mean
    chosen_std = tuple(float(v) for v in spec.std) if spec.std is not None else std
    return chosen_mean, chosen_std  # type: ignore[return-value]


def input_size(spec: DataSpec, kind: str) -> int:
    """The spec's input size where given, else the default of source ``kind``."""
    return spec.input_size if spec.input_size is not None else DEFAULT_INPUT_SIZE[kind]
