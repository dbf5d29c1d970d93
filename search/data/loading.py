"""``load_dataset``: one entry point for every source a ``--data`` string names.

Three sources are understood (the ``source`` string of :class:`DataSpec`): ``digits``
(:mod:`search.data.digits`), ``imagefolder:PATH`` (:mod:`search.data.imagefolder`) and
``cifar10:PATH`` or plain ``cifar10``, downloaded once (:mod:`search.data.cifar10`,
:mod:`search.data.cifar10_download`). This module checks the spec and the path, hands
the spec to its source and checks every split the source returns.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from search.data.cifar10 import load_cifar10
from search.data.cifar10_download import downloaded_cifar10
from search.data.dataset import SPLIT_NAMES, Dataset, Split
from search.data.digits import load_digits
from search.data.imagefolder import load_imagefolder
from search.data.spec import DEFAULT_INPUT_SIZE, DataSpec
from search.errors import UsageError
from search.progress import NullReporter, Reporter

__all__ = ["default_input_size", "load_dataset"]

_ACCEPTED_FORMS = "digits, imagefolder:PATH, cifar10 (downloaded) or cifar10:PATH"


def default_input_size(source: str) -> int:
    """The default model input side for ``source`` (a full source string or just its kind)."""
    kind = source.split(":", 1)[0].strip().lower()
    if kind not in DEFAULT_INPUT_SIZE:
        raise UsageError(f"unknown data source {source!r}; use {_ACCEPTED_FORMS}")
    return DEFAULT_INPUT_SIZE[kind]


def load_dataset(spec: DataSpec, reporter: Reporter | None = None) -> Dataset:
    """Load the data set ``spec`` describes into memory (decoding images if needed)."""
    reporter = reporter or NullReporter()
    kind, path = _parse_source(spec.source)
    _check_spec(spec)
    if kind == "digits":
        data = load_digits(spec)
    elif kind == "cifar10" and path is None:
        data = load_cifar10(downloaded_cifar10(reporter).resolve(), spec)
    elif kind == "cifar10":
        data = load_cifar10(_existing_folder(_required(path, kind)), spec)
    else:
        data = load_imagefolder(_existing_folder(_required(path, kind)), spec, reporter)
    for name in SPLIT_NAMES:
        split = getattr(data, name)
        if split is not None:
            _check_split(data.name, name, split)
    test = f" / {len(data.test)} test" if data.test is not None else ""
    reporter.info(
        f"data {data.name}: {len(data.train)} train / {len(data.val)} val{test} images, "
        f"{data.num_classes} classes, input {data.input_size}×{data.input_size}"
    )
    return data


def _parse_source(source: str) -> tuple[str, str | None]:
    """Split ``source`` into its kind and (for folder sources) its path text."""
    kind, sep, path = source.strip().partition(":")
    kind = kind.strip().lower()
    if kind in ("digits", "cifar10") and not sep:
        return kind, None
    if kind in ("imagefolder", "cifar10") and sep:
        return kind, path.strip()
    if kind == "imagefolder":
        raise UsageError(f"data source {source!r} needs a folder; write {kind}:PATH")
    raise UsageError(f"unknown data source {source!r}; use {_ACCEPTED_FORMS}")


def _required(path: str | None, kind: str) -> str:
    if not path:
        raise UsageError(f"data source {kind}: has an empty path; write {kind}:PATH")
    return path


def _existing_folder(path_text: str) -> Path:
    path = Path(os.path.expanduser(path_text))
    if not path.exists():
        raise UsageError(f"data folder {path} does not exist; check the path")
    if not path.is_dir():
        raise UsageError(f"data path {path} is not a folder; point it at the data set's folder")
    return path.resolve()


def _check_spec(spec: DataSpec) -> None:
    """Reject sizes, normalisation and fractions that cannot work."""
    if spec.input_size is not None and spec.input_size < 1:
        raise UsageError(f"input size must be a positive number of pixels, got {spec.input_size}")
    for name, value in (("mean", spec.mean), ("std", spec.std)):
        if value is not None and len(value) != 3:
            raise UsageError(
                f"{name} needs 3 values (one per RGB channel), got {len(value)}; pass e.g. --{name} 0.5,0.5,0.5"
            )
    if spec.std is not None and any(not s > 0 for s in spec.std):
        raise UsageError(f"std values must be positive, got {tuple(spec.std)}")
    if not 0 < spec.val_fraction < 1:
        raise UsageError(f"val fraction must be between 0 and 1 (exclusive), got {spec.val_fraction}")


def _check_split(dataset: str, name: str, split: Split) -> None:
    if len(split) == 0:
        raise UsageError(f"the {name} split of {dataset} is empty; add images to it")
    present = int(torch.unique(split.labels).numel())
    if present < 2:
        raise UsageError(
            f"the {name} split of {dataset} holds only {present} class; "
            "a classifier needs images of at least 2 classes in every split"
        )
