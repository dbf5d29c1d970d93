"""``cifar10:PATH``: the CIFAR-10 python version (``cifar-10-batches-py``), read from its pickles.

``PATH`` is the extracted folder or the folder holding it; plain ``cifar10`` downloads the archive
once into a cache folder (:mod:`search.data.cifar10_download`). The test split is
``test_batch``; val is the last 10% of each class (by index order) of ``data_batch_1..5``. The
images are written once to the on-disk cache (:mod:`search.data.cache`) and read from there a
batch at a time: at 32 px for small inputs, already resized for full-size ones. The cache is keyed on
the pickles' sizes and modification times; their bytes are hashed while decoding (the study's
:attr:`~search.data.dataset.Dataset.content_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from search.data.cache import DECODED_CACHE_ENV, MAX_MEMORY_BYTES, Layout, decoded_cache_path, open_or_decode
from search.data.cifar10_download import CIFAR10_FILES
from search.data.dataset import Dataset, Split
from search.data.fingerprint import base_payload, fingerprint
from search.data.spec import CIFAR10_MEAN, CIFAR10_STD, DataSpec, input_size, normalisation
from search.data.splits import select, tail_holdout
from search.data.store import FileSink
from search.data.transforms import crop_for, describe, stored_size
from search.errors import UsageError

__all__ = ["load_cifar10"]

"""Largest CIFAR-10 held in memory (when the on-disk cache is off)."""
_CIFAR10_VAL_FRACTION = 0.1  # last 10% of each class (by index order) of data_batch_*
_CIFAR10_FILES = CIFAR10_FILES


def load_cifar10(path: Path, spec: DataSpec) -> Dataset:
    """CIFAR-10 python pickles; val = last 10% of each class of data_batch_1..5.

    ``path`` is an existing folder: the extracted ``cifar-10-batches-py`` or the folder holding it.
    """
    folder = _cifar_folder(path)
    for name in _CIFAR10_FILES:
        if not (folder / name).is_file():
            raise UsageError(
                f"CIFAR-10 file {folder / name} is missing; put the python version "
                "(cifar-10-batches-py) there, or pass plain --data cifar10 to download it"
            )
    meta = _read_pickle(folder / "batches.meta")
    classes = [_text(n) for n in _field(meta, b"label_names", folder / "batches.meta")]
    size = input_size(spec, "cifar10")
    crop = crop_for(size)
    stored = 32 if crop == "pad" else stored_size(size, crop)  # small inputs upscale per batch
    files = {n: (folder / n).stat().st_size for n in _CIFAR10_FILES}
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in _CIFAR10_FILES}
    cache = decoded_cache_path(["cifar10", str(folder), stored, files, mtimes])
    digests: dict[str, str] = {}
    if cache is None:
        splits = {
            name: Split(*_resized(images, labels, stored))
            for name, (images, labels) in _parts(folder, classes, digests)
        }
        content = _content(digests)
    else:

        def decode(handle: BinaryIO) -> Layout:
            layout: Layout = {"splits": {}}
            for name, (images, labels) in _parts(folder, classes, digests):
                sink = FileSink(handle)
                for start in range(0, len(images), _CHUNK):
                    for image in _resize(images[start : start + _CHUNK], stored):
                        sink.add(image.numpy())
                part = {"count": sink.count, "height": stored, "width": stored, "labels": labels.tolist()}
                layout["splits"][name] = part
            layout["notes"] = {"content_sha256": _content(digests)}
            return layout

        splits, layout = open_or_decode(
            cache, 60000 * 3 * stored * stored, decode, source=["cifar10", str(folder), stored]
        )
        content = layout.get("notes", {}).get("content_sha256")
    train, val, test = splits["train"], splits["val"], splits["test"]
    mean, std = normalisation(spec, CIFAR10_MEAN, CIFAR10_STD)
    payload = base_payload("cifar10", classes, {"train": train, "val": val, "test": test}, size, mean, std)
    payload["path"] = str(folder)
    payload["files"] = files
    if crop != "pad":
        payload["transforms"] = describe(crop, size, True, "bilinear", stored)
    return Dataset(
        "cifar10",
        classes,
        train,
        val,
        test,
        size,
        mean,
        std,
        flip=True,
        fingerprint=fingerprint(payload),
        content_sha256=content,
        crop=crop,
    )


def _content(digests: dict[str, str]) -> str:
    """One short hash of the batch files' SHA-256s (batches.meta only names the classes)."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


_CHUNK = 500  # images resized at a time while decoding


def _parts(
    folder: Path, classes: list[str], digests: dict[str, str]
) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(split name, (uint8 N×3×32×32 images, labels)) for train, val and test, in that order.

    Fills ``digests`` with each batch file's SHA-256, taken from the bytes read anyway."""
    batches = [_cifar_batch(folder / f"data_batch_{i}", len(classes), digests) for i in range(1, 6)]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    del batches
    train_i, val_i = tail_holdout(labels.numpy(), _CIFAR10_VAL_FRACTION)
    for name, index in (("train", train_i), ("val", val_i)):
        part = select(images, labels, index)
        yield name, (part.images, part.labels)  # type: ignore[misc]
    del images
    yield "test", _cifar_batch(folder / "test_batch", len(classes), digests)


def _resize(images: torch.Tensor, stored: int) -> torch.Tensor:
    if images.shape[-1] == stored:
        return images
    x = F.interpolate(images.float(), size=(stored, stored), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _resized(images: torch.Tensor, labels: torch.Tensor, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In memory (the cache is off): the images at the stored size."""
    if stored != images.shape[-1] and len(images) * 3 * stored * stored > MAX_MEMORY_BYTES:
        raise UsageError(
            f"CIFAR-10 at stored size {stored} needs more than {MAX_MEMORY_BYTES // 1024**3} GiB of memory with "
            f"{DECODED_CACHE_ENV} empty; set {DECODED_CACHE_ENV} to a folder to read the images from disk"
        )
    return torch.cat([_resize(images[i : i + _CHUNK], stored) for i in range(0, len(images), _CHUNK)]), labels


def _cifar_folder(folder: Path) -> Path:
    nested = folder / "cifar-10-batches-py"
    return nested if nested.is_dir() else folder


def _read_pickle(path: Path, digests: dict[str, str] | None = None) -> dict[Any, Any]:
    try:
        raw = path.read_bytes()
        if digests is not None:
            digests[path.name] = hashlib.sha256(raw).hexdigest()
        content = pickle.loads(raw, encoding="bytes")
    except (
        OSError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
    ) as error:
        raise UsageError(f"cannot read CIFAR-10 file {path}: {error}; re-extract the archive") from error
    if not isinstance(content, dict):
        raise UsageError(f"CIFAR-10 file {path} does not hold a dict; re-extract the archive")
    return content


def _field(content: dict[Any, Any], key: bytes, path: Path) -> Any:
    for candidate in (key, key.decode()):
        if candidate in content:
            return content[candidate]
    raise UsageError(f"CIFAR-10 file {path} has no {key.decode()!r} entry; re-extract the archive")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cifar_batch(path: Path, num_classes: int, digests: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×3×32×32 images and int64 labels of one CIFAR-10 batch file."""
    content = _read_pickle(path, digests)
    data = np.asarray(_field(content, b"data", path), dtype=np.uint8)
    labels = np.asarray(_field(content, b"labels", path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise UsageError(
            f"CIFAR-10 file {path} holds data of shape {data.shape} with {labels.shape[0]} "
            "labels, expected N×3072 and N labels; re-extract the archive"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"CIFAR-10 file {path} has labels outside 0..{num_classes - 1}; re-extract the archive")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)
