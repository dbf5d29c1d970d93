"""``digits``: scikit-learn's 1797 real 8×8 handwritten digits (ships with scikit-learn, no download).

Split 70/15/15 into train/val/test, stratified and seeded. Images are stored at 8×8 and upscaled
per batch; the default input size is 224 so that latency reflects the usual resolution of stock
ImageNet models. Mean and std default to the per-channel statistics of the train split.
"""

from __future__ import annotations

import numpy as np
import torch

from search.data.dataset import Dataset
from search.data.fingerprint import base_payload, fingerprint
from search.data.spec import DataSpec, Triple, input_size, normalisation
from search.data.splits import select, stratified_split

__all__ = ["load_digits"]

_DIGITS_HOLDOUT = (0.15, 0.15)  # val, test fractions of each digit class


def load_digits(spec: DataSpec) -> Dataset:
    """scikit-learn's 8×8 digits, stratified 70/15/15 with ``spec.seed``."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = np.rint(np.asarray(bunch.data, dtype=np.float64) * (255.0 / 16.0))
    gray = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).view(-1, 1, 8, 8)
    images = gray.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_i, val_i, test_i = stratified_split(labels.numpy(), _DIGITS_HOLDOUT, spec.seed)
    train = select(images, labels, train_i)
    val = select(images, labels, val_i)
    test = select(images, labels, test_i)
    mean, std = normalisation(spec, *_channel_stats(train.images))
    size = input_size(spec, "digits")
    classes = [str(d) for d in range(10)]
    payload = base_payload("digits", classes, {"train": train, "val": val, "test": test}, size, mean, std)
    payload["seed"] = spec.seed
    payload["upsample"] = "nearest"
    return Dataset(
        "digits",
        classes,
        train,
        val,
        test,
        size,
        mean,
        std,
        flip=False,
        upsample="nearest",
        fingerprint=fingerprint(payload),
    )


def _channel_stats(images: torch.Tensor) -> tuple[Triple, Triple]:
    """Per-channel mean and std (0..1 scale) of uint8 N×3×h×w images, rounded to 4 places."""
    x = images.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    rounded_mean = tuple(round(v, 4) for v in mean)
    rounded_std = tuple(round(v, 4) for v in std)
    return rounded_mean, rounded_std  # type: ignore[return-value]
