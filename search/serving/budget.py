"""Memory for decoding, bounded per request and in total: reserved from the image's header, before decoding.

A request reserves what its image will cost decoded and converted to RGB (its size times the bytes
per pixel of its mode, plus the conversion's: :func:`decoded_bytes`). Over ``per_request`` it is
refused (413); otherwise it waits until the requests in flight leave room under ``total``, so
however many requests run at once, the decoded images together stay under ``total``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MemoryBudget", "Reservation", "decoded_bytes"]

_STORED = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
"""Bytes per pixel as Pillow holds a mode (1-bit images take a byte); 4 for the rest (RGB is padded to 4)."""
_GRAY = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
"""Modes converted through an 8-bit gray copy (and Pillow's copy of it; in strips, so wider temporaries stay small)."""


def decoded_bytes(mode: str, width: int, height: int, *, rotated: bool = False) -> int:
    """Bytes to hold the decoded image, its turned copy (EXIF rotation) and its 8-bit RGB conversion."""
    pixels = width * height
    stored = _STORED.get(mode, 4)
    turned = stored if rotated else 0
    if mode == "RGB":
        return pixels * (stored + turned)
    return pixels * (stored + turned + (2 if mode in _GRAY else 0) + 4)


class Reservation:
    """What one request holds of a :class:`MemoryBudget`."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    def take(self, nbytes: int) -> None:
        """Reserve ``nbytes`` more (waits for room); :class:`OverBudget` past the per-request cap."""
        if self.held + nbytes > self._budget.per_request:
            raise OverBudget(self.held + nbytes, self._budget.per_request)
        self._budget._acquire(nbytes)
        self.held += nbytes


class OverBudget(Exception):
    def __init__(self, wanted: int, cap: int) -> None:
        super().__init__(f"{wanted} bytes over the cap of {cap}")
        self.wanted, self.cap = wanted, cap


class MemoryBudget:
    """``total`` bytes shared by the requests in flight, at most ``per_request`` each (thread-safe)."""

    def __init__(self, total: int, per_request: int) -> None:
        self.total = total
        self.per_request = min(per_request, total)
        self.used = 0
        self.peak = 0
        self._room = threading.Condition()

    @contextmanager
    def request(self) -> Iterator[Reservation]:
        """A reservation released when the request is done with its images."""
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            with self._room:
                self.used -= reservation.held
                self._room.notify_all()

    def _acquire(self, nbytes: int) -> None:
        with self._room:
            self._room.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
