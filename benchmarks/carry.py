"""What a long benchmark keeps between sessions: its results cache, and the databases of its searches.

A benchmark's working folder (``benchmarks/.NAME/``) is ignored by git and vanishes with the machine,
while a full run can take several sessions. So a run may mirror what a later session needs into
tracked files: :class:`ResultsCache` writes ``results.json`` and, beside it, a tracked copy that a
new machine starts from; :func:`carry_study` keeps a copy of each search's SQLite database (small:
the trials and their records, no weights) and puts it back where the working folder lost it, so the
search resumes instead of starting over with other trials.
"""

from __future__ import annotations

import json
import os
import shutil
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

    def save(self) -> None:
        """Write the cache, and its tracked mirror, each atomically."""
        _write(self.path, json.dumps(self.data, indent=1))
        if self.mirror is not None:
            _write(self.mirror, json.dumps(self.data, indent=1) + "\n")


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
