"""Decoded ``imagefolder:`` images kept on disk, so a second run skips decoding.

One ``.pt`` file per data folder, exact file listing (paths, byte sizes, labels) and input size,
in ``decoded/`` under the folder :data:`DECODED_CACHE_ENV` names. A damaged file is decoded
again; a disk that cannot be written only costs the next run a decode.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from search.data.dataset import Split

__all__ = ["DECODED_CACHE_ENV", "FileListing", "decoded_cache_path", "read_decoded", "write_decoded"]

DECODED_CACHE_ENV = "PRUNE_SEARCH_CACHE"
"""Environment variable naming the folder for decoded ``imagefolder:`` data (default
``~/.cache/prune-search``; set it to an empty string to turn the cache off)."""


class FileListing(Protocol):
    """What the cache key is made of: one split's image files, their byte sizes and labels."""

    files: list[str]
    sizes: list[int]
    labels: list[int]


def decoded_cache_path(root: Path, size: int, lists: Mapping[str, FileListing]) -> Path | None:
    """Where the decoded images of exactly these files at this size are kept between runs."""
    folder = os.environ.get(DECODED_CACHE_ENV, str(Path.home() / ".cache" / "prune-search"))
    if not folder:
        return None
    listing = {name: [f.files, f.sizes, f.labels] for name, f in lists.items()}
    key = hashlib.sha256(json.dumps([1, str(root), size, listing]).encode()).hexdigest()[:24]
    return Path(folder) / "decoded" / f"{key}.pt"


def read_decoded(path: Path | None) -> dict[str, Split] | None:
    """The splits kept at ``path``, or ``None`` when there are none (or they cannot be read)."""
    if path is None or not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        return {name: Split(images, labels) for name, (images, labels) in stored.items()}
    except Exception:  # a damaged or foreign file: decode again (and overwrite it)
        return None


def write_decoded(path: Path | None, splits: dict[str, Split]) -> None:
    """Keep ``splits`` at ``path``: written to a partial file, then renamed into place."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({name: (s.images, s.labels) for name, s in splits.items()}, partial)
        os.replace(partial, path)
    except OSError:  # a read-only or full disk only costs the next run a decode
        pass
