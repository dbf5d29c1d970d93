"""Fixed, seeded hold-outs shared by the sources: per-class split indices and selecting them.

Splits are stratified (every class is divided in the same proportions) and deterministic, so a
data set loaded twice with the same seed has the same train/val/test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from search.data.dataset import Split

__all__ = ["part_counts", "select", "stratified_split", "tail_holdout"]


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of [rest, part 1, part 2, ...], each part taking ``fraction`` of every class.

    Within a class the order is the given index order, permuted by a generator seeded with
    ``seed``. A class with enough images gets at least one image in every part and keeps at
    least one for the rest. Returned index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        counts = part_counts(len(members), fractions)
        start = 0
        for k, count in enumerate(counts, start=1):
            parts[k].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def part_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """How many of ``total`` images each holdout part takes (rest stays for training)."""
    counts = [round(total * f) for f in fractions]
    for k in range(len(counts)):
        if counts[k] == 0 and total - sum(counts) > 1:
            counts[k] = 1
    while counts and sum(counts) >= total and max(counts) > 0:
        counts[counts.index(max(counts))] -= 1
    return counts


def tail_holdout(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: val is the last ``fraction`` of each class in index order."""
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        (count,) = part_counts(len(members), (fraction,))
        if count:
            val.append(members[len(members) - count :])
    val_index = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_index = np.setdiff1d(np.arange(len(labels)), val_index)
    return train_index, val_index


def select(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> Split:
    """The images and labels at ``index`` as a :class:`Split` of their own."""
    chosen = torch.from_numpy(index.astype(np.int64))
    return Split(images[chosen].contiguous(), labels[chosen].contiguous())
