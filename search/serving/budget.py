"""Memory the requests take, bounded in total: their bodies as they arrive, their images before decoding.

Bodies (:class:`BodyBudget`): a request reserves what its body will take (from its Content-Length,
or chunk by chunk) before it is read, and holds it until it is answered, queue for a slot included.
When the requests in flight have spent the budget, it is refused at once (503, retry after a
second) rather than made to wait: a waiting client would hold its connection and what the kernel
buffers of its body. So however many clients upload at once, their bodies stay under the total.

Decoding (:class:`MemoryBudget`): a request reserves what its image will cost decoded and converted
to RGB (its size times the bytes per pixel of its mode, plus the conversion's:
:func:`decoded_bytes`). Over ``per_request`` it is refused (413); otherwise it waits until the
requests in flight leave room under ``total``, so however many requests run at once, the decoded
images together stay under ``total``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BodyBudget", "BodyHold", "MemoryBudget", "NoRoom", "Reservation", "decoded_bytes"]

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


class NoRoom(Exception):
    """The upload budget is spent by the requests in flight: answer 503 and let the client retry."""

    def __init__(self, wanted: int, total: int) -> None:
        super().__init__(f"{wanted} more bytes of uploads do not fit in {total}")
        self.wanted, self.total = wanted, total


class BodyHold:
    """What one request holds of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more, or :class:`NoRoom` (holding nothing more) if the budget has no room for them."""
        self._budget._take(nbytes)
        self.held += nbytes

    def shrink_to(self, nbytes: int) -> None:
        """Give back all but ``nbytes`` (the body is gone, its image stays)."""
        if nbytes < self.held:
            self._budget._give(self.held - nbytes)
            self.held = nbytes


class BodyBudget:
    """``total`` bytes of request bodies in memory at once, never waited for (used from the event loop only)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0

    @contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """A hold released when the request has been answered."""
        hold = BodyHold(self)
        try:
            yield hold
        finally:
            self._give(hold.held)

    def _take(self, nbytes: int) -> None:
        if self.used + nbytes > self.total:
            raise NoRoom(nbytes, self.total)
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def _give(self, nbytes: int) -> None:
        self.used -= nbytes
