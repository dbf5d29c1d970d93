"""``cifar10:PATH``: the CIFAR-10 python version (``cifar-10-batches-py``), read from its pickles.

Never downloaded. ``PATH`` is the extracted folder or the folder holding it. The test split is
``test_batch``; val is the last 10% of each class (by index order) of ``data_batch_1..5``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.data.dataset import Dataset, Split
from search.data.fingerprint import base_payload, fingerprint
from search.data.spec import CIFAR10_MEAN, CIFAR10_STD, DataSpec, input_size, normalisation
from search.data.splits import select, tail_holdout
from search.errors import UsageError

__all__ = ["load_cifar10"]

_CIFAR10_VAL_FRACTION = 0.1  # last 10% of each class (by index order) of data_batch_*
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def load_cifar10(path: Path, spec: DataSpec) -> Dataset:
    """CIFAR-10 python pickles; val = last 10% of each class of data_batch_1..5.

    ``path`` is an existing folder: the extracted ``cifar-10-batches-py`` or the folder holding it.
    """
    folder = _cifar_folder(path)
    for name in _CIFAR10_FILES:
        if not (folder / name).is_file():
            raise UsageError(
                f"CIFAR-10 file {folder / name} is missing; put the python version "
                "(cifar-10-batches-py) there yourself, this tool never downloads data"
            )
    meta = _read_pickle(folder / "batches.meta")
    classes = [_text(n) for n in _field(meta, b"label_names", folder / "batches.meta")]
    batches = [_cifar_batch(folder / f"data_batch_{i}", len(classes)) for i in range(1, 6)]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    train_i, val_i = tail_holdout(labels.numpy(), _CIFAR10_VAL_FRACTION)
    train = select(images, labels, train_i)
    val = select(images, labels, val_i)
    test = Split(*_cifar_batch(folder / "test_batch", len(classes)))
    mean, std = normalisation(spec, CIFAR10_MEAN, CIFAR10_STD)
    size = input_size(spec, "cifar10")
    payload = base_payload("cifar10", classes, {"train": train, "val": val, "test": test}, size, mean, std)
    payload["path"] = str(folder)
    payload["files"] = {n: (folder / n).stat().st_size for n in _CIFAR10_FILES}
    return Dataset("cifar10", classes, train, val, test, size, mean, std, flip=True, fingerprint=fingerprint(payload))


def _cifar_folder(folder: Path) -> Path:
    nested = folder / "cifar-10-batches-py"
    return nested if nested.is_dir() else folder


def _read_pickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
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


def _cifar_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×3×32×32 images and int64 labels of one CIFAR-10 batch file."""
    content = _read_pickle(path)
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
