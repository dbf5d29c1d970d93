"""What a long benchmark keeps between sessions: its results cache, and the databases of its searches.

A benchmark's working folder (``benchmarks/.NAME/``) is ignored by git and vanishes with the machine,
while a full run can take several sessions. So a run may mirror what a later session needs into
tracked files: :class:`ResultsCache` writes ``results.json`` and, beside it, a tracked copy that a
new machine starts from; :func:`carry_study` keeps a copy of each search's SQLite database (small:
the trials and their records, no weights) and puts it back where the working folder lost it, so the
search resumes instead of starting over with other trials.

Two runs of one benchmark may share a working folder, one per core (``--helper``): the cache
merges what each writes, and :meth:`ResultsCache.claim` lets one run take a result the other is
already computing and the other skip it, to wait for it only when it needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ResultsCache", "carry_study"]

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    from benchmarks.allocation import log as allocation_log  # allocation imports this module

    allocation_log(message)


class ResultsCache:
    """``work/results.json`` as a dict, merged with the tracked ``mirror`` (entries the work folder lacks)."""

    def __init__(self, work: Path, mirror: Path | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "results.json"
        self.mirror = mirror
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        if mirror is not None and mirror.is_file():
            carried = {k: v for k, v in json.loads(mirror.read_text()).items() if k not in self.data}
            if carried:
                log(f"{len(carried)} results carried over from {mirror.name}")
                self.data.update(carried)

    def refresh(self) -> None:
        """Take in what another run sharing the working folder has written since."""
        if self.path.exists():
            self.data.update({k: v for k, v in json.loads(self.path.read_text()).items() if k not in self.data})

    def save(self) -> None:
        """Write the cache (merged with what another run wrote), and its tracked mirror, each atomically."""
        with self._locked(self.path.with_suffix(".lock"), blocking=True):
            self.refresh()
            _write(self.path, json.dumps(self.data, indent=1))
            if self.mirror is not None:
                _write(self.mirror, json.dumps(self.data, indent=1) + "\n")

    @contextlib.contextmanager
    def claim(self, key: str, wait: bool) -> Iterator[bool]:
        """Hold ``key`` while computing it: yields False (without waiting) while another run holds it.

        With ``wait`` it waits for the other run instead, and then yields True: the caller looks
        for the other run's result first (a run that died leaves none, and the caller computes it).
        """
        lock = self.path.parent / "claims" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".lock")
        lock.parent.mkdir(exist_ok=True)
        with self._locked(lock, blocking=wait) as held:
            if held:
                self.refresh()
            yield held

    @staticmethod
    @contextlib.contextmanager
    def _locked(path: Path, blocking: bool) -> Iterator[bool]:
        with open(path, "a") as handle:  # an flock dies with its process: a killed run frees its claims
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


def carry_study(studies: Path, name: str, mirror: Path | None) -> None:
    """Copy study ``name``'s database into ``mirror`` (tracked), or back from it when ``studies`` lacks it."""
    if mirror is None:
        return
    here, kept = studies / f"{name}.db", mirror / f"{name}.db"
    if here.is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(here, kept)
    elif kept.is_file():
        studies.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, here)
        log(f"study {name} carried over from {kept.relative_to(ROOT) if kept.is_relative_to(ROOT) else kept}")
