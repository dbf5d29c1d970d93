"""Image-classification data sets as uint8 images (in memory, or on disk), served as normalised batches.

Batches are produced on demand: cropping or resizing to the input size, augmentation and
normalisation happen per batch on tensors, so memory holds a batch, not the data set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.data

from search.data.spec import Triple
from search.data.store import DiskImages, take
from search.data.transforms import augment, describe, to_input
from search.errors import UsageError

__all__ = ["SPLIT_NAMES", "Dataset", "Split"]

SPLIT_NAMES = ("train", "val", "test")
"""The splits a data set can have, in order; ``test`` is optional."""


@dataclass
class Split:
    """One split: uint8 images N×3×h×w (stored size; in memory, or on disk read a batch at a time) and
    int64 labels N (always in memory)."""

    images: torch.Tensor | DiskImages
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
    """Short sha256 hex of the source (file names and sizes), splits, size and normalisation; stable across runs
    and machines (a study stores it: what it hashes stays as it was, so existing studies resume)."""
    content_sha256: str | None = None
    """Short sha256 hex of the source files' bytes (``None`` for the built-in digits), which tells a file
    replaced by another of the same size; a study stores it next to :attr:`fingerprint`."""
    upsample: str = "bilinear"
    """How stored images are enlarged to ``input_size``: ``nearest`` keeps the sharp pixel edges
    of tiny images (digits are 8x8), ``bilinear`` suits photos."""
    crop: str = "pad"
    """The transforms' regime (:mod:`search.data.transforms`): ``pad`` or ``resized``."""
    loader_workers: int = 0
    """Worker processes that read and transform batches of images kept on disk (0: this process)."""
    pin_memory: bool = False
    """Whether those workers hand batches over in pinned memory (for copies to a GPU)."""
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
        augmentation); ``limit`` caps the number of images served. ``augment`` applies the
        training transforms of :mod:`search.data.transforms` (per :attr:`crop`), otherwise the
        fixed evaluation transform. Images on disk are read a batch at a time, by
        :attr:`loader_workers` worker processes when there are any (each batch's augmentation is
        seeded by ``seed`` and its position, so the number of workers does not change it).
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
        maker = _BatchMaker(self, data, order, batch_size, augment, seed, generator)
        if isinstance(data.images, torch.Tensor):  # in memory: one generator, in order
            yield from (maker[i] for i in range(len(maker)))
            return
        maker.shared = None
        workers = min(self.loader_workers, len(maker) // 4)  # a short pass is not worth starting processes
        if workers < 1:
            yield from (maker[i] for i in range(len(maker)))
            return
        loader = torch.utils.data.DataLoader(
            maker, batch_size=None, shuffle=False, num_workers=workers, pin_memory=self.pin_memory, prefetch_factor=4
        )
        yield from loader

    def shuffled_order(self, split: str, count: int | None = None, *, seed: int = 0) -> torch.Tensor:
        """The indices into ``split`` that :meth:`batches` serves, in order, when it shuffles with ``seed`` and
        ``limit=count``: the first ``count`` of one fixed permutation (a smaller read is a prefix of a larger).
        It draws that permutation as :meth:`batches` does (a test holds the two together)."""
        size = len(self.split(split))
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(size, generator=generator)[: size if count is None else max(0, min(count, size))]

    def transforms(self) -> dict[str, Any]:
        """What :meth:`batches` does to the images, as plain values (recorded on studies and cards)."""
        stored = self.train.images.shape[-1]
        return describe(self.crop, self.input_size, self.flip, self.upsample, int(stored))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros shaped like one model input batch: ``batch``×3×S×S float32."""
        return torch.zeros(batch, 3, self.input_size, self.input_size)


# --------------------------------------------------------------------------- batches


class _BatchMaker(torch.utils.data.Dataset):
    """Batch ``i`` of one pass: read, transformed, normalised (picklable, for loader workers)."""

    def __init__(
        self,
        data: Dataset,
        split: Split,
        order: torch.Tensor,
        batch_size: int,
        augment: bool,
        seed: int,
        shared: torch.Generator | None,
    ) -> None:
        self.images, self.labels, self.order, self.batch_size = split.images, split.labels, order, batch_size
        self.augment, self.seed, self.shared = augment, seed, shared
        self.size, self.crop, self.flip, self.upsample = data.input_size, data.crop, data.flip, data.upsample
        self.mean, self.std = data._mean_tensor, data._std_tensor

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        images = take(self.images, index)
        if self.augment:
            generator = self.shared or torch.Generator().manual_seed(_batch_seed(self.seed, i))
            x = augment(images, self.size, self.crop, self.flip, generator, self.upsample)
        else:
            x = to_input(images, self.size, self.crop, self.upsample)
        return (x - self.mean) / self.std, self.labels[index]


def _batch_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
