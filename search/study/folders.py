"""Folders a run makes, removed again when it is refused before it stores anything in them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["first_missing", "remove_unused"]


def first_missing(folder: Path) -> Path | None:
    """The outermost folder on ``folder``'s path that does not exist yet (what making it creates), or None."""
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            return missing
        missing = path
    return missing


def remove_unused(folder: Path | None, made_from: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``made_from`` where they are empty: a run that made them and was
    refused or stopped before it stored anything leaves no empty folders behind."""
    if folder is None or made_from is None:
        return
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()  # only an empty folder goes
        except FileNotFoundError:  # not made yet (the run stopped before it), or made by no one: its parent next
            pass
        except OSError:  # not empty: it holds something this run did not make, or weights
            return
        if path == made_from:
            return
