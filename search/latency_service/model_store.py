"""The models a latency target holds: uploaded bytes by SHA-256, in memory, the least recently used dropped first."""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["ModelStore"]


class ModelStore:
    """Uploaded models by SHA-256, the least recently used dropped past ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._models: OrderedDict[str, tuple[bytes, list[int | str]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: str) -> tuple[bytes, list[int | str]] | None:
        with self._lock:
            found = self._models.get(sha)
            if found is not None:
                self._models.move_to_end(sha)
            return found

    def put(self, sha: str, data: bytes, input_shape: list[int | str]) -> None:
        with self._lock:
            self._models[sha] = (data, input_shape)
            self._models.move_to_end(sha)
            while sum(len(d) for d, _ in self._models.values()) > self._capacity and len(self._models) > 1:
                self._models.popitem(last=False)
