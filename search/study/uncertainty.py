"""How sure an accuracy is: Wilson intervals, per-image correctness records, and the paired McNemar test.

An accuracy read on ``n`` images is a count of successes; its Wilson 95% interval says how far the
accuracy on the whole distribution may lie from it. Two models read on the *same* images are compared
image by image: only the images one got right and the other wrong (the discordant ones) tell them
apart, and the exact McNemar (sign) test says whether their split is more lopsided than chance.

Torch-free: the reports read these records without loading a model.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ALPHA",
    "SPLIT_ORDER",
    "SUBSET_ORDER",
    "Z95",
    "accuracy_record",
    "mcnemar_p",
    "pack_correct",
    "paired_counts",
    "unpack_correct",
    "wilson",
]

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""

ALPHA = 0.05
"""Significance level of the paired test: a p-value at or below it separates two trials."""


def wilson(correct: int, images: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``correct`` successes out of ``images`` (95% by default)."""
    if images <= 0:
        raise ValueError("an interval needs at least one image")
    if not 0 <= correct <= images:
        raise ValueError(f"{correct} correct out of {images} images is impossible")
    p = correct / images
    z2 = z * z
    centre = (p + z2 / (2 * images)) / (1 + z2 / images)
    half = z / (1 + z2 / images) * math.sqrt(p * (1 - p) / images + z2 / (4 * images * images))
    return max(0.0, centre - half), min(1.0, centre + half)


def pack_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness, in evaluation order, as base64 of its bits (8 images a byte, first image high)."""
    data = bytearray((len(correct) + 7) // 8)
    for i, ok in enumerate(correct):
        if ok:
            data[i >> 3] |= 0x80 >> (i & 7)
    return base64.b64encode(bytes(data)).decode("ascii")


def unpack_correct(packed: str, images: int) -> list[bool]:
    """The inverse of :func:`pack_correct` for a record of ``images`` images."""
    data = base64.b64decode(packed.encode("ascii"), validate=True)
    if len(data) != (images + 7) // 8:
        raise ValueError(f"a correctness record of {len(data)} bytes cannot hold {images} images")
    return [bool(data[i >> 3] & (0x80 >> (i & 7))) for i in range(images)]


SPLIT_ORDER = "split"
"""``order`` of a record read on the whole validation split in its own order (a subset's record has none)."""
SUBSET_ORDER = "subset"
"""``order`` of a promotion's record read on a fixed subset of the split (``--rung-val-images``): it pairs with the
other promotions' reads of that subset, never with a whole-split record, which lacked the mark before it existed."""


def accuracy_record(correct: Sequence[bool], *, whole_split: bool = False) -> dict[str, Any]:
    """What a trial stores beside its accuracy: image count, Wilson interval and the packed correctness.

    ``whole_split``: the images are the whole split in its own order, marked ``order`` so that such a record is
    only ever paired with another read the same way (before that order existed, a read of ``--val-images`` at
    least the split's size went through the split shuffled, unmarked)."""
    images, hits = len(correct), sum(bool(c) for c in correct)
    low, high = wilson(hits, images)
    record = {"images": images, "correct": hits, "interval": [low, high], "per_image": pack_correct(correct)}
    return {**record, "order": SPLIT_ORDER} if whole_split else record


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """Discordant images: (right only by ``a``, right only by ``b``)."""
    if len(a) != len(b):
        raise ValueError(f"paired records differ in length ({len(a)} and {len(b)} images)")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return only_a, only_b


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the sign test of ``only_a`` against ``only_b`` discordant images."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)
