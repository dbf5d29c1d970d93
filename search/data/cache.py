"""Decoded images kept on disk between runs and read from there, a batch at a time.

One pair of files per decoded data set in ``decoded/`` under the folder :data:`DECODED_CACHE_ENV`
names: ``KEY.bin`` (every split's uint8 3×h×w rows, one split after the other) and ``KEY.json``
(where each split starts, its labels, and what decoding noted). The key hashes what the source
says identifies the images (exact file listing, byte sizes, modification times, stored size), so a
file replaced in place is decoded again. Each entry records its source (folder and stored size):
writing a new entry removes the older entries of the same source, which describe files that have
since changed, so the folder holds one entry per data set and stored size. Written once: one
process decodes while holding ``KEY.lock`` (others wait on it, then read what it wrote), into a
partial file renamed into place, the ``.json`` last; a file that does not match its ``.json`` is
decoded again. The images are then served by :class:`~search.data.store.DiskImages`, so a
process's memory does not grow with the data set.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from search.data.dataset import Split
from search.data.store import DiskImages
from search.errors import UsageError

__all__ = ["DECODED_CACHE_ENV", "FORMAT", "MAX_MEMORY_BYTES", "decoded_cache_path", "open_or_decode"]

MAX_MEMORY_BYTES = 4 * 1024**3
"""The most decoded images held in memory when the cache is off."""
DECODED_CACHE_ENV = "PRUNE_SEARCH_CACHE"
"""Environment variable naming the folder for decoded images (default ``~/.cache/prune-search``;
an empty string turns the cache off, and images are then held in memory)."""

FORMAT = 3
"""Version of the files' layout, part of every key."""

Layout = dict[str, Any]
"""What a decoder returns: ``{"splits": {name: {"count", "height", "width", "labels"}}, "notes": {...}}``,
splits in the order their rows were written."""


def decoded_cache_path(identity: Any) -> Path | None:
    """Where the decoded images ``identity`` (JSON-able) describes are kept; ``None`` when the cache is off."""
    folder = os.environ.get(DECODED_CACHE_ENV, str(Path.home() / ".cache" / "prune-search"))
    if not folder:
        return None
    key = hashlib.sha256(json.dumps([FORMAT, identity], sort_keys=True).encode()).hexdigest()[:24]
    return Path(folder) / "decoded" / key


def open_or_decode(
    base: Path, needed_bytes: int, decode: Callable[[BinaryIO], Layout], source: Any = None
) -> tuple[dict[str, Split], Layout]:
    """The splits kept at ``base``, decoding them first (``decode`` writes rows to a file) if needed.

    ``source`` (JSON-able: the folder and stored size, without the file listing) names what the
    entry is the decoded form of; once a new entry is written, other entries of the same source are
    stale and removed. Returns the splits and the layout. Safe when several
    processes start at once: one decodes, the others wait and read its files.
    """
    found = _open(base)
    if found is not None:
        return found
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the decoded-image folder {base.parent} ({error}); {_fix()}") from error
    with _locked(base):
        found = _open(base)
        if found is not None:
            return found
        free = shutil.disk_usage(base.parent).free
        if needed_bytes > free:
            raise UsageError(
                f"the decoded images need {needed_bytes / 1024**3:.1f} GiB in {base.parent} but only "
                f"{free / 1024**3:.1f} GiB are free; {_fix()} or pass a smaller --input-size"
            )
        _write(base, decode, source)
    _remove_stale(base, source)
    found = _open(base)
    if found is None:
        raise UsageError(f"the decoded images written to {base}.bin cannot be read back; {_fix()}")
    return found


def _fix() -> str:
    return f"set {DECODED_CACHE_ENV} to a folder with room (an empty value holds the images in memory)"


@contextmanager
def _locked(base: Path) -> Iterator[None]:
    with open(base.with_name(base.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # waits while another process decodes
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write(base: Path, decode: Callable[[BinaryIO], Layout], source: Any) -> None:
    partial = base.with_name(f"{base.name}.{os.getpid()}.partial")
    partial_json = base.with_name(f"{base.name}.{os.getpid()}.json.partial")
    try:
        with open(partial, "wb") as handle:
            layout = decode(handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial_json.write_text(
            json.dumps({"format": FORMAT, "bytes": partial.stat().st_size, "source": source, **layout})
        )
        os.replace(partial, base.with_suffix(".bin"))
        os.replace(partial_json, base.with_suffix(".json"))  # the commit point: readers look for it
    except OSError as error:
        raise UsageError(f"cannot write decoded images to {base.parent} ({error}); {_fix()}") from error
    finally:
        for leftover in (partial, partial_json):
            leftover.unlink(missing_ok=True)


def _remove_stale(base: Path, source: Any) -> None:
    """Remove the entries of ``source`` other than ``base``: images of files that have changed since.

    An entry another process is decoding right now (its lock held) is left alone, and so is one a running
    process reads (its readers' lock held, :func:`_hold`): its loader workers open the file by its path.
    """
    if source is None:
        return
    for meta in base.parent.glob("*.json"):
        if meta.stem == base.name:
            continue
        try:
            if json.loads(meta.read_text()).get("source") != json.loads(json.dumps(source)):
                continue
        except (OSError, ValueError, AttributeError):
            continue
        other = meta.with_suffix("")
        lock = other.with_name(other.name + ".lock")
        own = _HELD.pop(other, None)  # this process moves on to the new entry (its open file stays readable)
        if own is not None:
            own.close()
        try:
            with open(lock, "a+b") as handle, open(_readers(other), "a+b") as readers:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(readers.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                for path in (meta, other.with_suffix(".bin")):
                    path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            _readers(other).unlink(missing_ok=True)
        except OSError:  # being written or read by another process, or not ours to remove
            continue


def _open(base: Path) -> tuple[dict[str, Split], Layout] | None:
    """The splits at ``base`` when its two files exist and agree, else ``None``."""
    data, meta = base.with_suffix(".bin"), base.with_suffix(".json")
    try:
        layout = json.loads(meta.read_text())
        if layout.get("format") != FORMAT or data.stat().st_size != layout["bytes"]:
            return None
        splits: dict[str, Split] = {}
        offset = 0
        for name, part in layout["splits"].items():
            count, height, width = int(part["count"]), int(part["height"]), int(part["width"])
            labels = torch.tensor(part["labels"], dtype=torch.int64)
            if len(labels) != count:
                return None
            splits[name] = Split(DiskImages(data, offset, count, height, width), labels)
            offset += count * 3 * height * width
        if offset != layout["bytes"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _hold(base)
    return splits, layout


_HELD: dict[Path, Any] = {}
"""The readers' lock of every entry this process reads, held (shared) while the process lives."""


def _readers(base: Path) -> Path:
    return base.with_name(base.name + ".readers")


def _hold(base: Path) -> None:
    """Mark ``base`` as read by this process (and the loader workers it starts, which reopen it by path)."""
    if base in _HELD:
        return
    try:
        handle = open(_readers(base), "a+b")  # held open on purpose, for the process's life
    except OSError:  # a read-only cache folder: nobody removes anything from it either
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
    except OSError:
        handle.close()
        return
    _HELD[base] = handle
