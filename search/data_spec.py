"""What data a user asked for, as plain values (light to import: the CLI parses it before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataSpec", "Triple"]

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DataSpec:
    """What the user asked for; :func:`load_dataset` turns it into a :class:`Dataset`."""

    source: str
    """``"digits"``, ``"imagefolder:PATH"`` or ``"cifar10:PATH"``."""
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
