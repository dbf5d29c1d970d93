"""Decoded images kept in a file and read a batch at a time, so memory does not grow with the data set.

A split's images are rows of uint8 3×h×w in one raw file (see :mod:`search.data.cache`).
:class:`DiskImages` reads the rows a batch asks for with ``pread`` into a fresh buffer: the
operating system's page cache keeps hot rows fast, and the process holds only the batch (a
memory map would count every page it ever touched as resident). It pickles as its path, so
loader worker processes open the file themselves.

Writing goes through a sink: :class:`MemorySink` fills a tensor (when the cache is off) and
:class:`FileSink` appends rows to an open file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["DiskImages", "FileSink", "ImageSink", "MemorySink", "take"]


class DiskImages:
    """``count`` uint8 images 3×h×w stored row after row in ``path`` from byte ``offset`` on."""

    dtype = torch.uint8

    def __init__(self, path: Path, offset: int, count: int, height: int, width: int) -> None:
        self.path = Path(path)
        self.offset = offset
        self.count = count
        self.height = height
        self.width = width
        self._fd: int | None = None
        self._pid = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, 3, self.height, self.width)

    @property
    def row_bytes(self) -> int:
        return 3 * self.height * self.width

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, 0
        return state

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The images at ``index`` (an int, a slice, or a sequence/tensor of ints) as a new tensor."""
        single = isinstance(index, int | np.integer)
        rows = np.arange(self.count)[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        rows = rows.reshape(-1)
        if rows.size and (rows.min() < -self.count or rows.max() >= self.count):
            raise IndexError(f"image index out of range for {self.count} images")
        rows = np.where(rows < 0, rows + self.count, rows)
        out = np.empty((len(rows), 3, self.height, self.width), dtype=np.uint8)
        fd, size = self._handle(), self.row_bytes
        flat = out.reshape(len(rows), size)
        start = 0
        while start < len(rows):  # runs of consecutive rows are read in one call
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            _read_exactly(fd, memoryview(flat[start:end]).cast("B"), self.offset + int(rows[start]) * size)
            start = end
        tensor = torch.from_numpy(out)
        return tensor[0] if single else tensor


def _read_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise OSError(f"decoded image file ended early at byte {offset + done}")
        done += got


def take(images: torch.Tensor | DiskImages, index: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``images[index]`` for in-memory tensors and :class:`DiskImages` alike (rows read in sorted order)."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(index, dtype=torch.int64)]
    rows = np.asarray(index, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    read = images[rows[order]]
    result = torch.empty_like(read)
    result[torch.from_numpy(order)] = read
    return result


class ImageSink:
    """Where decoded images go, one uint8 3×h×w array at a time."""

    def add(self, image: np.ndarray) -> None:
        raise NotImplementedError


class MemorySink(ImageSink):
    """Fills a preallocated uint8 tensor of at most ``capacity`` images."""

    def __init__(self, capacity: int, height: int, width: int) -> None:
        self.images = torch.empty((capacity, 3, height, width), dtype=torch.uint8)
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        self.images[self.count] = torch.from_numpy(np.ascontiguousarray(image))
        self.count += 1

    def result(self) -> torch.Tensor:
        return self.images if self.count == len(self.images) else self.images[: self.count].clone()


class FileSink(ImageSink):
    """Appends rows to ``handle`` (opened for binary writing); ``count`` says how many so far."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        self.count += 1
