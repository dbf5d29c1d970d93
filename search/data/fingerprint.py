"""Fingerprints of loaded data sets: a short, stable hash of what was loaded and how.

Each source describes its data set with :func:`base_payload` plus what identifies its files, and
hashes that with :func:`fingerprint`; equal fingerprints mean the same images, splits, input size
and normalisation across runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from search.data.dataset import Split
from search.data.spec import Triple

__all__ = ["base_payload", "fingerprint"]


def fingerprint(payload: dict[str, Any]) -> str:
    """Short, stable sha256 hex of a JSON-able description."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_payload(
    kind: str,
    classes: list[str],
    splits: dict[str, Split | None],
    size: int,
    mean: Triple,
    std: Triple,
) -> dict[str, Any]:
    """What every source's payload holds: kind, classes, split sizes, input size and normalisation."""
    return {
        "version": 1,
        "kind": kind,
        "classes": classes,
        "counts": {k: (len(v) if v is not None else None) for k, v in splits.items()},
        "input_size": size,
        "mean": [round(v, 6) for v in mean],
        "std": [round(v, 6) for v in std],
    }
