"""Image-classification data sets held in memory as uint8 tensors, served as normalised batches.

Batches are produced on demand: resizing to the input size, augmentation and normalisation
happen per batch on tensors, so small stored images stay cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from search.data.spec import Triple
from search.errors import UsageError

__all__ = ["SPLIT_NAMES", "Dataset", "Split"]

SPLIT_NAMES = ("train", "val", "test")
"""The splits a data set can have, in order; ``test`` is optional."""


@dataclass
class Split:
    """One split held in memory: uint8 images N×3×h×w (stored size) and int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A loaded data set: splits in memory plus how to turn them into model inputs."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split | None
    input_size: int
    mean: Triple
    std: Triple
    flip: bool
    """Whether a horizontal flip is a valid augmentation (False for digits)."""
    fingerprint: str
    """Short sha256 hex of source contents, splits, size and normalisation; stable across runs."""
    upsample: str = "bilinear"
    """How stored images are enlarged to ``input_size``: ``nearest`` keeps the sharp pixel edges
    of tiny images (digits are 8x8), ``bilinear`` suits photos."""
    _mean_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    _std_tensor: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._mean_tensor = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_tensor = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output width)."""
        return len(self.classes)

    def split(self, name: str) -> Split:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        chosen = getattr(self, name)
        if chosen is None:
            raise UsageError(
                f"data set {self.name} has no {name} split; evaluate on val instead or provide a {name}/ folder"
            )
        return chosen

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x float32 N×3×S×S normalised at ``input_size``, y int64 N.

        ``shuffle`` permutes with a generator seeded by ``seed`` (which also drives
        augmentation); ``limit`` caps the number of images served. ``augment`` applies a random
        crop with reflect padding of ``input_size // 8`` and, when :attr:`flip`, a random
        horizontal flip.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        data = self.split(split)
        generator = torch.Generator().manual_seed(seed)
        count = len(data) if limit is None else max(0, min(limit, len(data)))
        if shuffle:
            order = torch.randperm(len(data), generator=generator)[:count]
        else:
            order = torch.arange(count)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            x = _to_input(data.images[index], self.input_size, self.upsample)
            if augment:
                x = _augment(x, self.flip, generator)
            yield (x - self._mean_tensor) / self._std_tensor, data.labels[index]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros shaped like one model input batch: ``batch``×3×S×S float32."""
        return torch.zeros(batch, 3, self.input_size, self.input_size)


# --------------------------------------------------------------------------- batches


def _to_input(images: torch.Tensor, size: int, upsample: str = "bilinear") -> torch.Tensor:
    """uint8 N×3×h×w → float32 N×3×size×size in 0..1 (bilinear antialiased when shrinking)."""
    x = images.float().div_(255.0)
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        shrink = height > size or width > size
        if upsample == "nearest" and not shrink:
            x = F.interpolate(x, size=(size, size), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def _augment(x: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding of size//8, then a random horizontal flip if allowed."""
    count, size = x.shape[0], x.shape[-1]
    pad = size // 8
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, top : top + size, left : left + size] for i, (top, left) in enumerate(offsets)])
    if flip:
        mirror = torch.rand(count, generator=generator) < 0.5
        x[mirror] = x[mirror].flip(-1)
    return x
