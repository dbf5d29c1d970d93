"""Image-classification data sets held in memory as uint8 tensors, served as normalised batches.

Three sources are understood (the ``source`` string of :class:`DataSpec`):

``digits``
    scikit-learn's 1797 real 8×8 handwritten digits (ships with scikit-learn, no download),
    split 70/15/15 into train/val/test, stratified and seeded. Images are stored at 8×8 and
    upscaled per batch; the default input size is 224 so that latency reflects the usual
    resolution of stock ImageNet models. Mean and std default to the per-channel statistics of
    the train split.
``imagefolder:PATH``
    torchvision's ImageFolder layout: ``PATH/train/<class>/<image>`` and ``PATH/val/...``
    (optional ``PATH/test/...``), or ``PATH/<class>/<image>`` split per class into train/val.
    Images are decoded once with PIL, resized (shorter side) and centre-cropped to the input size
    and kept in memory as uint8.
``cifar10:PATH``
    the CIFAR-10 python version (``cifar-10-batches-py``), read from its pickles; never
    downloaded.

Batches are produced on demand: resizing to the input size, augmentation and normalisation
happen per batch on tensors, so small stored images stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from search.data_spec import DataSpec, Triple
from search.errors import UsageError
from search.progress import NullReporter, Reporter

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_MEMORY_BYTES",
    "DataSpec",
    "Dataset",
    "Split",
    "default_input_size",
    "load_dataset",
]


IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
CIFAR10_MEAN: Triple = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Triple = (0.2470, 0.2435, 0.2616)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File extensions (lower case) that ``imagefolder:`` decodes; matched case-insensitively."""

MAX_MEMORY_BYTES = 4 * 1024**3
"""Largest decoded ``imagefolder:`` data set (uint8, all splits) that is held in memory."""

_DEFAULT_INPUT_SIZE = {"digits": 224, "imagefolder": 224, "cifar10": 32}
_ACCEPTED_FORMS = "digits, imagefolder:PATH or cifar10:PATH"
_DIGITS_HOLDOUT = (0.15, 0.15)  # val, test fractions of each digit class
_CIFAR10_VAL_FRACTION = 0.1  # last 10% of each class (by index order) of data_batch_*
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_DECODE_CHUNK = 256  # images decoded between progress updates
DECODED_CACHE_ENV = "PRUNE_SEARCH_CACHE"
"""Environment variable naming the folder for decoded ``imagefolder:`` data (default
``~/.cache/prune-search``; set it to an empty string to turn the cache off)."""
_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- public types


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
        if name not in _SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(_SPLITS)}")
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


def default_input_size(source: str) -> int:
    """The default model input side for ``source`` (a full source string or just its kind)."""
    kind = source.split(":", 1)[0].strip().lower()
    if kind not in _DEFAULT_INPUT_SIZE:
        raise UsageError(f"unknown data source {source!r}; use {_ACCEPTED_FORMS}")
    return _DEFAULT_INPUT_SIZE[kind]


def load_dataset(spec: DataSpec, reporter: Reporter | None = None) -> Dataset:
    """Load the data set ``spec`` describes into memory (decoding images if needed)."""
    reporter = reporter or NullReporter()
    kind, path = _parse_source(spec.source)
    _check_spec(spec)
    if kind == "digits":
        data = _load_digits(spec)
    elif kind == "cifar10":
        data = _load_cifar10(_required(path, kind), spec)
    else:
        data = _load_imagefolder(_required(path, kind), spec, reporter)
    for name in _SPLITS:
        split = getattr(data, name)
        if split is not None:
            _check_split(data.name, name, split)
    test = f" / {len(data.test)} test" if data.test is not None else ""
    reporter.info(
        f"data {data.name}: {len(data.train)} train / {len(data.val)} val{test} images, "
        f"{data.num_classes} classes, input {data.input_size}×{data.input_size}"
    )
    return data


# --------------------------------------------------------------------------- spec handling


def _parse_source(source: str) -> tuple[str, str | None]:
    """Split ``source`` into its kind and (for folder sources) its path text."""
    kind, sep, path = source.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return kind, None
    if kind in ("imagefolder", "cifar10") and sep:
        return kind, path.strip()
    if kind in ("imagefolder", "cifar10"):
        raise UsageError(f"data source {source!r} needs a folder; write {kind}:PATH")
    raise UsageError(f"unknown data source {source!r}; use {_ACCEPTED_FORMS}")


def _required(path: str | None, kind: str) -> str:
    if not path:
        raise UsageError(f"data source {kind}: has an empty path; write {kind}:PATH")
    return path


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


def _normalisation(spec: DataSpec, mean: Triple, std: Triple) -> tuple[Triple, Triple]:
    """The spec's mean/std where given, else the source defaults."""
    chosen_mean = tuple(float(v) for v in spec.mean) if spec.mean is not None else mean
    chosen_std = tuple(float(v) for v in spec.std) if spec.std is not None else std
    return chosen_mean, chosen_std  # type: ignore[return-value]


def _input_size(spec: DataSpec, kind: str) -> int:
    return spec.input_size if spec.input_size is not None else _DEFAULT_INPUT_SIZE[kind]


def _check_split(dataset: str, name: str, split: Split) -> None:
    if len(split) == 0:
        raise UsageError(f"the {name} split of {dataset} is empty; add images to it")
    present = int(torch.unique(split.labels).numel())
    if present < 2:
        raise UsageError(
            f"the {name} split of {dataset} holds only {present} class; "
            "a classifier needs images of at least 2 classes in every split"
        )


def _fingerprint(payload: dict[str, Any]) -> str:
    """Short, stable sha256 hex of a JSON-able description."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base_payload(
    kind: str,
    classes: list[str],
    splits: dict[str, Split | None],
    size: int,
    mean: Triple,
    std: Triple,
) -> dict[str, Any]:
    return {
        "version": 1,
        "kind": kind,
        "classes": classes,
        "counts": {k: (len(v) if v is not None else None) for k, v in splits.items()},
        "input_size": size,
        "mean": [round(v, 6) for v in mean],
        "std": [round(v, 6) for v in std],
    }


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


# --------------------------------------------------------------------------- splitting


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
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
        counts = _part_counts(len(members), fractions)
        start = 0
        for k, count in enumerate(counts, start=1):
            parts[k].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _part_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """How many of ``total`` images each holdout part takes (rest stays for training)."""
    counts = [round(total * f) for f in fractions]
    for k in range(len(counts)):
        if counts[k] == 0 and total - sum(counts) > 1:
            counts[k] = 1
    while counts and sum(counts) >= total and max(counts) > 0:
        counts[counts.index(max(counts))] -= 1
    return counts


def _select(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> Split:
    chosen = torch.from_numpy(index.astype(np.int64))
    return Split(images[chosen].contiguous(), labels[chosen].contiguous())


# --------------------------------------------------------------------------- digits


def _load_digits(spec: DataSpec) -> Dataset:
    """scikit-learn's 8×8 digits, stratified 70/15/15 with ``spec.seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.data, dtype=np.float64) * (255.0 / 16.0))
    gray = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).view(-1, 1, 8, 8)
    images = gray.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_i, val_i, test_i = _stratified_split(labels.numpy(), _DIGITS_HOLDOUT, spec.seed)
    train = _select(images, labels, train_i)
    val = _select(images, labels, val_i)
    test = _select(images, labels, test_i)
    mean, std = _normalisation(spec, *_channel_stats(train.images))
    size = _input_size(spec, "digits")
    classes = [str(d) for d in range(10)]
    payload = _base_payload("digits", classes, {"train": train, "val": val, "test": test}, size, mean, std)
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
        fingerprint=_fingerprint(payload),
    )


def _channel_stats(images: torch.Tensor) -> tuple[Triple, Triple]:
    """Per-channel mean and std (0..1 scale) of uint8 N×3×h×w images, rounded to 4 places."""
    x = images.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    rounded_mean = tuple(round(v, 4) for v in mean)
    rounded_std = tuple(round(v, 4) for v in std)
    return rounded_mean, rounded_std  # type: ignore[return-value]


# --------------------------------------------------------------------------- cifar10


def _load_cifar10(path_text: str, spec: DataSpec) -> Dataset:
    """CIFAR-10 python pickles; val = last 10% of each class of data_batch_1..5."""
    folder = _cifar_folder(_existing_folder(path_text))
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
    train_i, val_i = _tail_holdout(labels.numpy(), _CIFAR10_VAL_FRACTION)
    train = _select(images, labels, train_i)
    val = _select(images, labels, val_i)
    test = Split(*_cifar_batch(folder / "test_batch", len(classes)))
    mean, std = _normalisation(spec, CIFAR10_MEAN, CIFAR10_STD)
    size = _input_size(spec, "cifar10")
    payload = _base_payload("cifar10", classes, {"train": train, "val": val, "test": test}, size, mean, std)
    payload["path"] = str(folder)
    payload["files"] = {n: (folder / n).stat().st_size for n in _CIFAR10_FILES}
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
        fingerprint=_fingerprint(payload),
    )


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


def _tail_holdout(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: val is the last ``fraction`` of each class in index order."""
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        (count,) = _part_counts(len(members), (fraction,))
        if count:
            val.append(members[len(members) - count :])
    val_index = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_index = np.setdiff1d(np.arange(len(labels)), val_index)
    return train_index, val_index


# --------------------------------------------------------------------------- imagefolder


@dataclass
class _FileList:
    """Image files of one split before decoding: paths, labels and how messages name it."""

    label: str
    root: Path
    files: list[str]
    """Paths relative to ``root`` (posix separators on posix systems)."""
    labels: list[int]
    sizes: list[int]


def _load_imagefolder(path_text: str, spec: DataSpec, reporter: Reporter) -> Dataset:
    """ImageFolder layout (train/ + val/ [+ test/], or class folders split by val_fraction)."""
    root = _existing_folder(path_text)
    classes, lists = _imagefolder_lists(root, spec, reporter)
    size = _input_size(spec, "imagefolder")
    total = sum(len(f.files) for f in lists.values())
    needed = total * 3 * size * size
    if needed > MAX_MEMORY_BYTES:
        raise UsageError(
            f"decoding {total} images at input size {size} needs {needed / 1024**3:.1f} GiB of "
            f"memory (limit {MAX_MEMORY_BYTES // 1024**3} GiB); pass a smaller --input-size"
        )
    splits: dict[str, Split | None] = {"train": None, "val": None, "test": None}
    cache = _decoded_cache_path(root, size, lists)
    cached = _read_decoded(cache)
    if cached is not None:
        splits.update(cached)
    else:
        failures = 0
        with reporter.task("decode images", total) as task:
            for name, file_list in lists.items():
                splits[name] = _decode_split(file_list, size, task, reporter)
                failures += len(file_list.files) - len(splits[name])  # type: ignore[arg-type]
        if not failures:  # a set with unreadable files is decoded again, so its warning is seen again
            _write_decoded(cache, {k: v for k, v in splits.items() if v is not None})
    mean, std = _normalisation(spec, IMAGENET_MEAN, IMAGENET_STD)
    payload = _base_payload("imagefolder", classes, splits, size, mean, std)
    payload["path"] = str(root)
    payload["files"] = {
        name: [[rel, nbytes] for rel, nbytes in zip(f.files, f.sizes, strict=True)] for name, f in lists.items()
    }
    if "val" not in _split_folders(root):
        payload["seed"] = spec.seed
        payload["val_fraction"] = spec.val_fraction
    train, val = splits["train"], splits["val"]
    assert train is not None and val is not None
    return Dataset(
        "imagefolder",
        classes,
        train,
        val,
        splits["test"],
        size,
        mean,
        std,
        flip=True,
        fingerprint=_fingerprint(payload),
    )


def _decoded_cache_path(root: Path, size: int, lists: dict[str, _FileList]) -> Path | None:
    """Where the decoded images of exactly these files at this size are kept between runs."""
    folder = os.environ.get(DECODED_CACHE_ENV, str(Path.home() / ".cache" / "prune-search"))
    if not folder:
        return None
    listing = {name: [f.files, f.sizes, f.labels] for name, f in lists.items()}
    key = hashlib.sha256(json.dumps([1, str(root), size, listing]).encode()).hexdigest()[:24]
    return Path(folder) / "decoded" / f"{key}.pt"


def _read_decoded(path: Path | None) -> dict[str, Split] | None:
    if path is None or not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        return {name: Split(images, labels) for name, (images, labels) in stored.items()}
    except Exception:  # a damaged or foreign file: decode again (and overwrite it)
        return None


def _write_decoded(path: Path | None, splits: dict[str, Split]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({name: (s.images, s.labels) for name, s in splits.items()}, partial)
        os.replace(partial, path)
    except OSError:  # a read-only or full disk only costs the next run a decode
        pass


def _existing_folder(path_text: str) -> Path:
    path = Path(os.path.expanduser(path_text))
    if not path.exists():
        raise UsageError(f"data folder {path} does not exist; check the path")
    if not path.is_dir():
        raise UsageError(f"data path {path} is not a folder; point it at the data set's folder")
    return path.resolve()


def _split_folders(root: Path) -> set[str]:
    return {name for name in _SPLITS if (root / name).is_dir()}


def _imagefolder_lists(root: Path, spec: DataSpec, reporter: Reporter) -> tuple[list[str], dict[str, _FileList]]:
    """Class names and per-split file lists for either supported layout."""
    if not any(not entry.name.startswith(".") for entry in os.scandir(root)):
        raise UsageError(
            f"data folder {root} is empty; expected {root}/<class>/<image> or {root}/train/<class>/<image>"
        )
    present = _split_folders(root)
    if not present & {"train", "val"}:
        classes, single = _scan_classes(root, root)
        return classes, _holdout(single, spec)
    if "train" not in present:
        raise UsageError(f"{root} has a val/ folder but no train/ folder; add {root}/train/<class>/<image>")
    classes, train = _scan_classes(root / "train", root)
    lists = {"train": train}
    if "val" not in present:
        reporter.info(f"{root} has no val/ folder; holding out {spec.val_fraction:.0%} of train/")
        lists = _holdout(train, spec)
    for name in ("val", "test"):
        if name in present:
            other_classes, lists[name] = _scan_classes(root / name, root)
            _same_classes(classes, other_classes, name)
    return classes, lists


def _same_classes(train: list[str], other: list[str], name: str) -> None:
    if train == other:
        return
    only_train = sorted(set(train) - set(other)) or ["none"]
    only_other = sorted(set(other) - set(train)) or ["none"]
    raise UsageError(
        f"train/ and {name}/ have different class folders (only in train/: "
        f"{', '.join(only_train[:5])}; only in {name}/: {', '.join(only_other[:5])}); "
        "every split needs the same class folders"
    )


def _scan_classes(folder: Path, root: Path) -> tuple[list[str], _FileList]:
    """Sorted class folder names under ``folder`` and their image files (sorted per class)."""
    class_dirs = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(class_dirs):
        found = _walk_images(folder / name, root)
        if not found:
            empty.append(name)
        for path, size in found:
            files.append(path)
            labels.append(label)
            sizes.append(size)
    if not files:
        raise UsageError(
            f"no images found under {folder}; expected {root}/<class>/<image> or {root}/train/<class>/<image>"
        )
    if empty:
        raise UsageError(
            f"class folder {folder / empty[0]} holds no images ({len(empty)} such folders); "
            "add images or remove the folder"
        )
    if len(class_dirs) < 2:
        raise UsageError(
            f"{folder} has only 1 class folder ({class_dirs[0]}); a classifier needs at least 2 class folders"
        )
    label_text = f"{folder.relative_to(root).as_posix()}/" if folder != root else f"{folder}/"
    return class_dirs, _FileList(label_text, root, files, labels, sizes)


def _walk_images(folder: Path, root: Path) -> list[tuple[str, int]]:
    """Image files under ``folder`` (recursively, hidden entries skipped) as paths relative to
    ``root`` with their byte sizes, sorted by relative path."""
    found: list[tuple[str, int]] = []
    skip = len(str(root)) + 1
    for current, dirs, names in os.walk(str(folder), followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(current, name)
            found.append((path[skip:], os.stat(path).st_size))
    found.sort()
    return found


def _holdout(files: _FileList, spec: DataSpec) -> dict[str, _FileList]:
    """Split one file list into train/val per class: ``val_fraction``, seeded, by sorted name."""
    train_i, val_i = _stratified_split(np.asarray(files.labels), (spec.val_fraction,), spec.seed)

    def pick(index: np.ndarray, name: str) -> _FileList:
        return _FileList(
            f"{files.label} ({name} part)",
            files.root,
            [files.files[i] for i in index],
            [files.labels[i] for i in index],
            [files.sizes[i] for i in index],
        )

    return {"train": pick(train_i, "train"), "val": pick(val_i, "val")}


def _decode_split(files: _FileList, size: int, task: Any, reporter: Reporter) -> Split:
    """Decode every file of ``files`` to uint8 3×size×size; unreadable files are skipped."""
    images = torch.empty((len(files.files), 3, size, size), dtype=torch.uint8)
    buffer = images.numpy()
    kept: list[int] = []
    failures: list[tuple[str, str]] = []
    root = str(files.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette/EXIF/decompression-bomb chatter
        for start in range(0, len(files.files), _DECODE_CHUNK):
            chunk = files.files[start : start + _DECODE_CHUNK]
            for offset, relative in enumerate(chunk):
                path = os.path.join(root, relative)
                index = start + offset
                try:
                    buffer[len(kept)] = _decode_image(path, size).transpose(2, 0, 1)
                except Exception as error:  # any decoder failure means the file is unreadable
                    failures.append((path, _reason(error)))
                    continue
                kept.append(index)
            task.advance(len(chunk))
    if failures:
        path, reason = failures[0]
        reporter.warn(
            f"skipped {len(failures)} unreadable image{'s' if len(failures) > 1 else ''} "
            f"in {files.label}, e.g. {path}: {reason}"
        )
    if not kept:
        raise UsageError(
            f"none of the {len(files.files)} images in {files.label} could be decoded "
            f"(e.g. {failures[0][0]}: {failures[0][1]}); check the files"
        )
    labels = torch.tensor([files.labels[i] for i in kept], dtype=torch.int64)
    if len(kept) < len(files.files):
        images = images[: len(kept)].clone()
    return Split(images, labels)


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _decode_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 size×size×3: shorter side resized to ``size``, then centre-cropped."""
    with Image.open(path) as opened:
        opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size (fast)
        image = opened.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w = max(size, round(width * scale))
        new_h = max(size, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)
