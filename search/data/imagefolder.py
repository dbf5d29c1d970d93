"""``imagefolder:PATH``: torchvision's ImageFolder layout, held in memory as uint8.

``PATH/train/<class>/<image>`` and ``PATH/val/...`` (optional ``PATH/test/...``), or
``PATH/<class>/<image>`` split per class into train/val. Images are decoded once with PIL, resized
(shorter side) and centre-cropped to their stored size (the input size, or a little more for
full-size inputs: :mod:`search.data.transforms`) and kept on disk as uint8, read from there a
batch at a time (see :mod:`search.data.cache`); with the cache off they are held in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from search.data.cache import DECODED_CACHE_ENV, MAX_MEMORY_BYTES, Layout, decoded_cache_path, open_or_decode
from search.data.dataset import SPLIT_NAMES, Dataset, Split
from search.data.fingerprint import base_payload, fingerprint
from search.data.resize import resize_centre_crop
from search.data.spec import IMAGENET_MEAN, IMAGENET_STD, DataSpec, input_size, normalisation
from search.data.splits import stratified_split
from search.data.store import FileSink, ImageSink, MemorySink
from search.data.transforms import crop_for, describe, stored_size
from search.errors import UsageError
from search.progress import Reporter

__all__ = ["IMAGE_EXTENSIONS", "MAX_MEMORY_BYTES", "load_imagefolder"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File extensions (lower case) that ``imagefolder:`` decodes; matched case-insensitively."""

"""Largest decoded ``imagefolder:`` data set (uint8, all splits) held in memory, when the on-disk cache is off."""

_DECODE_CHUNK = 256  # images decoded between progress updates


@dataclass
class _FileList:
    """Image files of one split before decoding: paths, labels and how messages name it."""

    label: str
    root: Path
    files: list[str]
    """Paths relative to ``root`` (posix separators on posix systems)."""
    labels: list[int]
    sizes: list[int]
    mtimes: list[int]
    """Modification times (ns): with the sizes, what the decoded-image cache is keyed on."""


def load_imagefolder(root: Path, spec: DataSpec, reporter: Reporter) -> Dataset:
    """ImageFolder layout (train/ + val/ [+ test/], or class folders split by val_fraction).

    ``root`` is an existing folder, resolved to an absolute path.
    """
    classes, lists = _imagefolder_lists(root, spec, reporter)
    size = input_size(spec, "imagefolder")
    if spec.input_size is None:
        _say_when_far_smaller(lists["train"], size, reporter)
    crop = crop_for(size)
    stored = stored_size(size, crop)
    total = sum(len(f.files) for f in lists.values())
    needed = total * 3 * stored * stored
    cache = decoded_cache_path(_identity(root, stored, lists))
    if cache is None:
        splits, content = _decode_in_memory(lists, total, needed, stored, size, reporter)
    else:

        def decode(handle: BinaryIO) -> Layout:
            with reporter.task("decode images", total) as task:
                return _decode_to_file(lists, stored, handle, task)

        source = ["imagefolder", str(root), stored, sorted(lists)]
        if "val" not in _split_folders(root):  # the held-out part depends on these: entries of each are kept
            source += [spec.seed, spec.val_fraction]
        found, layout = open_or_decode(cache, needed, decode, source=source)
        splits = {"train": None, "val": None, "test": None, **found}
        content = layout.get("notes", {}).get("content_sha256")
        for warning in layout.get("notes", {}).get("warnings", []):
            reporter.warn(warning)  # the same words on every run that reads these images
    mean, std = normalisation(spec, IMAGENET_MEAN, IMAGENET_STD)
    payload = base_payload("imagefolder", classes, splits, size, mean, std)
    payload["path"] = str(root)
    if crop != "pad":  # what changes the numbers is part of the fingerprint (the pad regime is as before)
        payload["transforms"] = describe(crop, size, True, "bilinear", stored)
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
        fingerprint=fingerprint(payload),
        content_sha256=content,
        crop=crop,
    )


SMALL_IMAGE_FACTOR = 3
"""Images whose longer side is this many times below the default input size are named once."""


def _say_when_far_smaller(files: _FileList, size: int, reporter: Reporter) -> None:
    """Warn once when ``--input-size`` was left to its default and the images are far smaller."""
    if not files.files:
        return
    try:
        with Image.open(files.root / files.files[0]) as image:
            width, height = image.size
    except (OSError, ValueError):
        return  # an unreadable file is reported when the images are decoded
    if max(width, height) * SMALL_IMAGE_FACTOR <= size:
        reporter.warn(
            f"the images are {width}x{height} (the first training image), far smaller than the default input "
            f"size {size}: each is upscaled {size / max(width, height):.0f}x, which makes every latency larger; "
            f"pass --input-size {max(width, height)} to search at their own size"
        )


def _split_folders(root: Path) -> set[str]:
    return {name for name in SPLIT_NAMES if (root / name).is_dir()}


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
    mtimes: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(class_dirs):
        found = _walk_images(folder / name, root)
        if not found:
            empty.append(name)
        for path, size, mtime in found:
            files.append(path)
            labels.append(label)
            sizes.append(size)
            mtimes.append(mtime)
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
    return class_dirs, _FileList(label_text, root, files, labels, sizes, mtimes)


def _walk_images(folder: Path, root: Path) -> list[tuple[str, int, int]]:
    """Image files under ``folder`` (recursively, hidden entries skipped) as paths relative to
    ``root`` with their byte sizes and modification times (ns), sorted by relative path."""
    found: list[tuple[str, int, int]] = []
    skip = len(str(root)) + 1
    for current, dirs, names in os.walk(str(folder), followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(current, name)
            stat = os.stat(path)
            found.append((path[skip:], stat.st_size, stat.st_mtime_ns))
    found.sort()
    return found


def _holdout(files: _FileList, spec: DataSpec) -> dict[str, _FileList]:
    """Split one file list into train/val per class: ``val_fraction``, seeded, by sorted name."""
    train_i, val_i = stratified_split(np.asarray(files.labels), (spec.val_fraction,), spec.seed)

    def pick(index: np.ndarray, name: str) -> _FileList:
        return _FileList(
            f"{files.label} ({name} part)",
            files.root,
            [files.files[i] for i in index],
            [files.labels[i] for i in index],
            [files.sizes[i] for i in index],
            [files.mtimes[i] for i in index],
        )

    return {"train": pick(train_i, "train"), "val": pick(val_i, "val")}


def _identity(root: Path, stored: int, lists: dict[str, _FileList]) -> list[Any]:
    """What the decoded images are a function of: the folder, the exact files (names, sizes, modification
    times) and the stored size. A file replaced in place gets a new modification time, so new images."""
    return ["imagefolder", str(root), stored, {n: [f.files, f.sizes, f.mtimes, f.labels] for n, f in lists.items()}]


def _decode_in_memory(
    lists: dict[str, _FileList], total: int, needed: int, stored: int, size: int, reporter: Reporter
) -> tuple[dict[str, Split | None], str]:
    """Every split decoded into memory (the cache is off), within :data:`MAX_MEMORY_BYTES`."""
    if needed > MAX_MEMORY_BYTES:
        raise UsageError(
            f"decoding {total} images at input size {size} needs {needed / 1024**3:.1f} GiB of "
            f"memory (limit {MAX_MEMORY_BYTES // 1024**3} GiB) with {DECODED_CACHE_ENV} empty; "
            f"set {DECODED_CACHE_ENV} to a folder to read them from disk, or pass a smaller --input-size"
        )
    splits: dict[str, Split | None] = {"train": None, "val": None, "test": None}
    content = hashlib.sha256()
    with reporter.task("decode images", total) as task:
        for name, file_list in lists.items():
            sink = MemorySink(len(file_list.files), stored, stored)
            labels, warning = _decode_split(file_list, stored, task, sink, content)
            if warning:
                reporter.warn(warning)
            splits[name] = Split(sink.result(), labels)
    return splits, content.hexdigest()[:16]


def _decode_to_file(lists: dict[str, _FileList], stored: int, handle: BinaryIO, task: Any) -> Layout:
    """Every split decoded, rows appended to ``handle``; the layout :mod:`search.data.cache` keeps."""
    layout: Layout = {"splits": {}, "notes": {"warnings": []}}
    content = hashlib.sha256()
    for name, file_list in lists.items():
        sink = FileSink(handle)
        labels, warning = _decode_split(file_list, stored, task, sink, content)
        layout["splits"][name] = {"count": sink.count, "height": stored, "width": stored, "labels": labels.tolist()}
        if warning:
            layout["notes"]["warnings"].append(warning)
    layout["notes"]["content_sha256"] = content.hexdigest()[:16]
    return layout


def _decode_split(
    files: _FileList, size: int, task: Any, sink: ImageSink, content: Any
) -> tuple[torch.Tensor, str | None]:
    """Decode every file of ``files`` to uint8 3×size×size into ``sink``; unreadable files are skipped.

    Each file's name and bytes go into ``content`` (a hashlib object) as they are read: the content
    hash costs no second read. Returns the kept images' labels and the warning that names skipped
    files (``None`` if none).
    """
    kept: list[int] = []
    failures: list[tuple[str, str]] = []
    root = str(files.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette/EXIF/decompression-bomb chatter
        for start in range(0, len(files.files), _DECODE_CHUNK):
            chunk = files.files[start : start + _DECODE_CHUNK]
            for offset, relative in enumerate(chunk):
                path = os.path.join(root, relative)
                content.update(relative.encode() + b"\0")
                try:
                    with open(path, "rb") as handle:
                        raw = handle.read()
                    content.update(hashlib.sha256(raw).digest())
                    image = _decode_image(raw, size).transpose(2, 0, 1)
                except Exception as error:  # any decoder failure means the file is unreadable
                    failures.append((path, _reason(error)))
                    continue
                sink.add(image)
                kept.append(start + offset)
            task.advance(len(chunk))
    if not kept:
        raise UsageError(
            f"none of the {len(files.files)} images in {files.label} could be decoded "
            f"(e.g. {failures[0][0]}: {failures[0][1]}); check the files"
        )
    warning = None
    if failures:
        path, reason = failures[0]
        warning = (
            f"skipped {len(failures)} unreadable image{'s' if len(failures) > 1 else ''} "
            f"in {files.label}, e.g. {path}: {reason}"
        )
    return torch.tensor([files.labels[i] for i in kept], dtype=torch.int64), warning


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _decode_image(raw: bytes, size: int) -> np.ndarray:
    """RGB uint8 size×size×3 of an image file's bytes: shorter side resized to ``size``, then centre-cropped."""
    with Image.open(io.BytesIO(raw)) as opened:
        opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size (fast)
        image = opened.convert("RGB")
    return np.asarray(resize_centre_crop(image, size), dtype=np.uint8)
