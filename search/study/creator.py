"""The worker creating a study shows it is alive; a worker that finds it being created waits while it is.

Creating a study takes minutes (the baseline, the budget-matched recipes, the latency-aware tables),
so no fixed wait tells a slow creator from a dead one. The creator therefore keeps a record on the
study, the user attribute ``creator`` (host, process, the step it is at, and a heartbeat renewed
every :data:`BEAT_SECONDS` by a thread), and each creation step it finishes is listed in the
attribute ``creation_steps``. A worker that finds the study not ready waits while the record shows
signs of life and says what it waits for. It takes creation over when the creator was stopped
(Ctrl-C marks the record on the way out), or has been silent for :data:`SILENT_SECONDS`: on the
same host by the heartbeat's time, on another host (whose clock may differ) by seeing the record
unchanged that long. Taking over is a compare-and-swap on the record in the database, so of several
waiters exactly one takes over; the creator it replaced notices that its record changed and stops.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import RDBStorage

from search.errors import UsageError
from search.progress import NullReporter, Reporter
from search.study.attr_row import read_attr, swap_attr
from search.study.coordination import READY_ATTR
from search.study.storage import load_existing

__all__ = [
    "BEAT_SECONDS",
    "CREATOR_ATTR",
    "SILENT_SECONDS",
    "STEPS_ATTR",
    "CreatorHeartbeat",
    "claim",
    "creating",
    "is_ready",
    "read_record",
    "record_step",
    "steps_done",
    "wait_until_ready",
]

CREATOR_ATTR = "creator"
"""Study user attribute: who is creating the study, at which step, and when it last showed it is alive."""

STEPS_ATTR = "creation_steps"
"""Study user attribute: the creation steps finished so far, in order (a rerun resumes after them)."""

BEAT_SECONDS = 3.0
"""How often the creating worker renews its heartbeat."""

SILENT_SECONDS = 30.0
"""A creator silent for this long is taken for stopped (ten missed heartbeats: a busy machine still beats)."""


def read_record(storage: RDBStorage, study_id: int) -> str | None:
    """The creator record as stored (its JSON text), or None when there is none."""
    return read_attr(storage, study_id, CREATOR_ATTR)


def _swap(storage: RDBStorage, study_id: int, old: str | None, new: dict[str, Any]) -> str | None:
    """Replace the creator record ``old`` (None: no record) by ``new`` if nobody changed it meanwhile.

    Returns the new record's text, or None when another worker changed the record first."""
    return swap_attr(storage, study_id, CREATOR_ATTR, old, new)


def _me(step: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "step": step,
        "beat": time.time(),
        "every": BEAT_SECONDS,
    }


def claim(storage: RDBStorage, study: optuna.Study, old: str | None, step: str) -> str | None:
    """Make this worker the study's creator, if the record is still ``old``; its record's text, or None."""
    return _swap(storage, study._study_id, old, _me(step))


def steps_done(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get(STEPS_ATTR) or [])


def record_step(study: optuna.Study, step: str) -> None:
    """Record that creation step ``step`` is done (a worker taking creation over does not redo it)."""
    done = steps_done(study)
    if step not in done:
        study.set_user_attr(STEPS_ATTR, [*done, step])


class CreatorHeartbeat:
    """Renews this worker's creator record while it creates the study, from a thread.

    ``step`` is shown to waiting workers. :meth:`stop` ends the heartbeat and raises when another
    worker took creation over meanwhile (this one was silent too long); :meth:`stopped` marks the
    record so that a rerun takes over at once instead of waiting for the silence.
    """

    def __init__(self, storage: RDBStorage, study: optuna.Study, record: str) -> None:
        self._storage = storage
        self._study = study
        self._record = record
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.step = json.loads(record).get("step", "")
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="creator-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, **extra: Any) -> None:
        with self._lock:
            if self.lost:
                return
            new = {**json.loads(self._record), "step": self.step, "beat": time.time(), **extra}
            try:
                text = _swap(self._storage, self._study._study_id, self._record, new)
            except Exception:  # the database is busy or unreachable for a moment: beat again later
                return
            if text is None:
                self.lost = True
            else:
                self._record = text

    def _run(self) -> None:
        while not self._done.wait(BEAT_SECONDS):
            self._beat()

    def stop(self) -> None:
        """End the heartbeat; raise when another worker took creation over while this one was silent."""
        self._done.set()
        self._thread.join()
        if self.lost:
            raise UsageError(
                f"another worker took over creating study {self._study.study_name!r} while this one was silent for "
                f"over {SILENT_SECONDS:g} s; run the same command again to join it"
            )

    def stopped(self) -> None:
        """End the heartbeat, marking the record: creation stopped here, a rerun takes it over at once."""
        self._done.set()
        self._thread.join()
        self._beat(stopped=True)

    def reporter(self, inner: Reporter) -> Reporter:
        """``inner``, with each phase also shown to waiting workers as the step this creator is at."""
        return _Narrated(self, inner)


class _Narrated(NullReporter):
    def __init__(self, beat: CreatorHeartbeat, inner: Reporter) -> None:
        self._beat = beat
        self._inner = inner

    def info(self, message: str) -> None:
        self._inner.info(message)

    def warn(self, message: str) -> None:
        self._inner.warn(message)

    def phase(self, name: str) -> None:
        self._beat.step = name
        self._inner.phase(name)

    def task(self, description: str, total: int | None) -> Any:
        return self._inner.task(description, total)


@contextmanager
def creating(storage: RDBStorage, study: optuna.Study, record: str) -> Iterator[CreatorHeartbeat]:
    """This worker creates ``study`` (its claimed creator ``record``): heartbeat while it does.

    If creation fails before any step is recorded the study is deleted (nothing of it is worth
    keeping, and a rerun starts cleanly); otherwise it is kept for a rerun to resume, with the
    creator record marked stopped so the rerun need not wait.
    """
    beat = CreatorHeartbeat(storage, study, record)
    try:
        yield beat
    except BaseException:
        beat.stopped()
        if not beat.lost and not steps_done(study):
            try:
                optuna.delete_study(study_name=study.study_name, storage=storage)
            except Exception:  # keep it rather than fail the cleanup: a rerun takes it over
                pass
        raise
    finally:
        beat._done.set()


# --------------------------------------------------------------------------- waiting for the creator


def is_ready(study: optuna.Study) -> bool:
    """True once the creating worker has finished setting the study up.

    A study made before creators kept a record (no ``creator`` attribute) counts as ready once it
    has been searched (it has finished trials); a half-built one never does, however old it is.
    """
    attrs = study.user_attrs
    if attrs.get(READY_ATTR):
        return True
    if CREATOR_ATTR in attrs:
        return False
    return any(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _gone(record: dict[str, Any] | None, unchanged_for: float) -> str | None:
    """Why the creator is taken for stopped, or None while it may be alive."""
    if record is not None and record.get("stopped"):
        return "the worker creating it was stopped before it finished"
    if record is None:
        return f"nobody has been creating it for {unchanged_for:.0f} s" if unchanged_for > SILENT_SECONDS else None
    same_host = record.get("host") == socket.gethostname()
    silent = time.time() - float(record.get("beat", 0)) if same_host else unchanged_for
    if silent > SILENT_SECONDS:
        return f"the worker creating it ({_who(record)}) has been silent for {silent:.0f} s"
    return None


def _who(record: dict[str, Any]) -> str:
    return f"{record.get('host', '?')}, process {record.get('pid', '?')}"


def wait_until_ready(
    storage: RDBStorage, name: str, reporter: Reporter | None = None, *, poll: float = 0.5
) -> tuple[optuna.Study | None, str | None]:
    """Wait while another worker creates study ``name``, for as long as it shows it is alive.

    Returns ``(study, None)`` once the study is ready; ``(study, record)`` when its creator had
    stopped and this worker took creation over (``record`` is its claimed creator record); and
    ``(None, None)`` when the study stays absent (its creator was refused, or discarded a
    half-built study to start again): the caller then tries to create it itself.
    """
    reporter = reporter or NullReporter()
    seen: object = object()
    changed_at = absent_since = time.monotonic()
    said = ""
    while True:
        now = time.monotonic()
        study = load_existing(storage, name)
        if study is None:
            if now - absent_since > SILENT_SECONDS:
                return None, None
            time.sleep(poll)
            continue
        absent_since = now
        if is_ready(study):
            return study, None
        raw = read_record(storage, study._study_id)
        if raw != seen:
            seen, changed_at = raw, now
        record = json.loads(raw) if raw else None
        why = _gone(record, now - changed_at)
        if why is not None:
            mine = claim(storage, study, raw, "take over creation")
            if mine is not None:
                reporter.info(f"Study {name!r} is not ready and {why}: this worker takes over creating it")
                return study, mine
            continue  # another worker took it over first: wait for that one
        if record is None:
            waiting = f"waiting for the worker that just created study {name!r} to start setting it up"
        else:
            waiting = (
                f"waiting for {_who(record)} to finish creating study {name!r} (now: {record.get('step')}); "
                f"it is taken for stopped after {SILENT_SECONDS:g} s without a heartbeat"
            )
        if waiting != said:  # a line for each creator waited for; its steps as they change
            if said.partition(" to ")[0] != waiting.partition(" to ")[0]:
                reporter.info(waiting[0].upper() + waiting[1:])
            reporter.phase(waiting)
            said = waiting
        time.sleep(poll)
