"""What setting a study up spends before its first trial, phase by phase.

Creating a study comes before any trial and can take minutes (the baseline, its latency, the
recipes' bisections; the latency-aware tables and what needs them come after the first trial,
:mod:`search.study.later_setup`, timed by a clock of their own). A :class:`CreationClock`
times each phase from the moment the data is ready: it says a plain line when a phase ends (with
its seconds and the time so far), a line every :data:`LINE_EVERY_S` while a long phase runs (so a
log shows where the time goes while it goes), and keeps the seconds on the study as the user
attribute :data:`CREATION_SECONDS` (``show``-able, and printed by ``search`` after its front).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna

from search.progress import Reporter

__all__ = ["CREATION_SECONDS", "LINE_EVERY_S", "CreationClock", "creation_line"]

CREATION_SECONDS = "creation_seconds"
"""Study user attribute: ``{"phases": {phase: seconds}, "total": seconds, "measurements": {phase: count},
"probes": {phase: count}}``, from the data being ready (the latency measurements the recipes' searches and
start-up samples took, and how many of them were quick probes)."""

OTHER = "other (between the phases)"

LINE_EVERY_S = 30.0
"""While a phase runs longer than this, a line says so this often."""


class CreationClock:
    """Times the phases before the first trial; :meth:`attach` keeps them on the study being created."""

    def __init__(
        self, reporter: Reporter, *, every: float = LINE_EVERY_S, attr: str = CREATION_SECONDS, when: str = ""
    ) -> None:
        self.reporter = reporter
        self.attr = attr
        """The study user attribute the phases are kept in."""
        self.when = when
        """Said in each phase's line ("after the first trial"); empty for the set-up before it."""
        self.seconds: dict[str, float] = {}
        self.measurements: dict[str, int] = {}
        """Latency measurements counted in each phase (:meth:`count`)."""
        self.probes: dict[str, int] = {}
        """How many of them were quick probes."""
        self._started = time.monotonic()
        self._every = every
        self._study: optuna.Study | None = None
        self._kept: dict[str, float] = {}
        self._kept_counts: dict[str, int] = {}
        self._kept_probes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._current: tuple[str, float] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the clock started (the data was ready)."""
        return time.monotonic() - self._started

    def attach(self, study: optuna.Study) -> None:
        """Record the phases on ``study`` from now on (with those a stopped creation recorded before)."""
        self._study = study
        stored = study.user_attrs.get(self.attr) or {}
        self._kept = {k: float(v) for k, v in (stored.get("phases") or {}).items()}
        self._kept_counts = {k: int(v) for k, v in (stored.get("measurements") or {}).items()}
        self._kept_probes = {k: int(v) for k, v in (stored.get("probes") or {}).items()}
        self._store()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the phase ``name`` (shown as the current phase too); its line says the seconds when it ends."""
        self.reporter.phase(name)
        started = time.monotonic()
        with self._lock:
            self._current = (name, started)
        self._start_thread()
        try:
            yield
        finally:
            took = time.monotonic() - started
            with self._lock:
                self._current = None
                self.seconds[name] = self.seconds.get(name, 0.0) + took
            counted = self.measurements.get(name)
            said = f", {counted} latency measurement{'s' if counted != 1 else ''}" if counted else ""
            if counted and self.probes.get(name):
                said += f" ({self.probes[name]} of them quick probes)"
            self.reporter.info(f"{self._head()}: {name}, {took:.1f} s{said} ({self._since()})")
            self._store()

    def _head(self) -> str:
        return f"Setup {self.when}" if self.when else "Setup"

    def _since(self) -> str:
        return f"{self.elapsed:.0f} s so far" if self.when else f"{self.elapsed:.0f} s since the data was ready"

    def count(self, *, probe: bool = False) -> None:
        """One more latency measurement in the current phase (``probe``: a quick one, fewer rounds)."""
        with self._lock:
            if self._current is not None:
                name = self._current[0]
                self.measurements[name] = self.measurements.get(name, 0) + 1
                if probe:
                    self.probes[name] = self.probes.get(name, 0) + 1

    def phases(self) -> dict[str, float]:
        """Every phase's seconds, those a stopped creation recorded before included."""
        merged = dict(self._kept)
        for name, seconds in self.seconds.items():
            merged[name] = merged.get(name, 0.0) + seconds
        return merged

    def to_dict(self) -> dict[str, Any]:
        phases = self.phases()
        return {
            "phases": {k: round(v, 1) for k, v in phases.items()},
            "total": round(sum(phases.values()), 1),
            "measurements": {**self._kept_counts, **self.measurements},
            "probes": {**self._kept_probes, **self.probes},
        }

    def settle(self) -> None:
        """Count the time between the phases (the settings, the study's records) as a phase of its own."""
        between = self.elapsed - sum(self.seconds.values())
        if between >= 0.05:
            self.seconds[OTHER] = self.seconds.get(OTHER, 0.0) + between
            self._started = time.monotonic() - sum(self.seconds.values())  # settling twice adds nothing
            self._store()

    def stop(self) -> None:
        """End the periodic lines (the clock can still time phases after, without them)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _store(self) -> None:
        if self._study is None:
            return
        try:
            self._study.set_user_attr(self.attr, self.to_dict())
        except Exception:  # what the phases cost is worth a line, never a failed creation
            pass

    def _start_thread(self) -> None:
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._run, name="creation-clock", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        said: dict[str, float] = {}
        while not self._done.wait(min(self._every, 5.0)):
            with self._lock:
                current = self._current
            if current is None:
                continue
            name, started = current
            running = time.monotonic() - started
            if running - said.get(f"{name}@{started}", 0.0) >= self._every:
                said[f"{name}@{started}"] = running
                self.reporter.info(f"{self._head()}: {name}, running for {running:.0f} s ({self._since()})")


def creation_line(study: optuna.Study, *, attr: str = CREATION_SECONDS, when: str = "") -> str | None:
    """One line on what setting ``study`` up cost before its first trial, phase by phase (None if not recorded);
    with ``attr`` and ``when`` ("after the first trial"), what the set-up it left for later cost."""
    stored = study.user_attrs.get(attr)
    if not stored or not stored.get("phases"):
        return None
    phases = sorted(stored["phases"].items(), key=lambda item: -float(item[1]))
    counts = stored.get("measurements") or {}
    probes = stored.get("probes") or {}

    def measured(name: str) -> str:
        if not counts.get(name):
            return ""
        return f" ({counts[name]} measured" + (f", {probes[name]} by quick probe)" if probes.get(name) else ")")

    shown = ", ".join(f"{name} {float(seconds):.1f} s{measured(name)}" for name, seconds in phases)
    total = float(stored.get("total", 0.0))
    if when:
        return f"Set-up {when}: {total:.0f} s ({shown})"
    return f"Set-up before the first trial: {total:.0f} s since the data was ready ({shown})"
