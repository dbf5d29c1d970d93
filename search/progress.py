"""How library code reports progress without printing.

Library code never writes to the console: it receives a :class:`Reporter` and calls it.
The CLI passes a rich-backed reporter (``search.cli.console``); tests and scripts use
:class:`NullReporter` or :class:`RecordingReporter`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["NullReporter", "RecordingReporter", "Reporter", "Task"]


class Task(Protocol):
    """A unit of long work with a known (or unknown) number of steps."""

    def advance(self, steps: int = 1, **fields: Any) -> None:
        """Mark ``steps`` more steps done; ``fields`` (loss=0.3, ...) are shown beside the bar."""


class Reporter(Protocol):
    def info(self, message: str) -> None:
        """A line worth keeping in the log (a finished trial, a measured baseline)."""

    def warn(self, message: str) -> None:
        """Something the user should know about but that does not stop the run."""

    def phase(self, name: str) -> None:
        """The current phase of the current piece of work ("latency", "fine-tune", ...)."""

    def task(self, description: str, total: int | None) -> Any:
        """A context manager yielding a :class:`Task` for work with ``total`` steps."""


class _NullTask:
    def advance(self, steps: int = 1, **fields: Any) -> None:
        pass


class NullReporter:
    """Reports nothing."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()


class _RecordingTask:
    def __init__(self, owner: RecordingReporter, description: str) -> None:
        self._owner = owner
        self._description = description

    def advance(self, steps: int = 1, **fields: Any) -> None:
        self._owner.steps[self._description] = self._owner.steps.get(self._description, 0) + steps


class RecordingReporter(NullReporter):
    """Keeps what it was told, for tests."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.phases: list[str] = []
        self.steps: dict[str, int] = {}

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def phase(self, name: str) -> None:
        self.phases.append(name)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _RecordingTask(self, description)
