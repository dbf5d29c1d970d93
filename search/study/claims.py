"""Exactly one worker promotes a trial to a rung: a claim row in the study, kept alive by a heartbeat.

The same claims keep two workers from timing one trial again at once (:mod:`search.study.confirm`,
``timing-again:N:REPEATS``); any key can be claimed through :func:`claim`.

A promotion is claimed by inserting the study user attribute ``promotion:N:R`` (trial N to rung
R). Optuna's schema makes ``(study_id, key)`` unique, so of several workers inserting the same
claim at once exactly one succeeds, on SQLite and PostgreSQL alike. The claim holds its worker's
host, process and a heartbeat renewed every :data:`BEAT_SECONDS` by a thread. A claim whose
worker stopped can be taken over, by a compare-and-swap on the row (again exactly one winner):
when it was marked stopped (Ctrl-C), when its process is gone (same host), or when its heartbeat
is older than :data:`SILENT_SECONDS` (any host; the hosts' clocks must agree to well within that).
A finished promotion's rung is recorded before its claim is marked done, so nothing finished is lost.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import optuna
from optuna.storages import RDBStorage

from search.study.attr_row import read_attr, swap_attr

__all__ = [
    "BEAT_SECONDS",
    "CLAIM_PREFIX",
    "SILENT_SECONDS",
    "Claim",
    "ClaimLost",
    "claim",
    "claim_key",
    "claim_promotion",
    "rdb_storage",
    "read_claim",
    "stale_reason",
]

CLAIM_PREFIX = "promotion:"
BEAT_SECONDS = 5.0
SILENT_SECONDS = 120.0
"""A claim whose heartbeat is this old is taken for abandoned (24 missed beats: a busy machine still beats)."""


def claim_key(number: int, rung: int) -> str:
    return f"{CLAIM_PREFIX}{number}:{rung}"


def rdb_storage(study: optuna.Study) -> RDBStorage:
    """The RDB storage under ``study`` (optuna wraps it in a cache), where claims are rows."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def read_claim(storage: RDBStorage, study_id: int, key: str) -> str | None:
    """The claim row's JSON text, or None when nobody claimed it."""
    return read_attr(storage, study_id, key)


def _swap(storage: RDBStorage, study_id: int, key: str, old: str | None, new: dict[str, Any]) -> str | None:
    """:func:`~search.study.attr_row.swap_attr`; SQLite busy past its timeout is a lost race, tried again later."""
    return swap_attr(storage, study_id, key, old, new, busy_is_lost=True)


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None where that cannot be read.

    A pid alone names a process only while it lives: a worker restarted in a new container is often pid 1
    again, and would take its dead predecessor's claim for its own, live one."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command's parentheses
    except (OSError, IndexError):
        return None


def _namespace() -> str | None:
    """This process's boot and pid namespace, in which a pid names one process (None where /proc cannot say).

    Workers in containers that share a host name (``--network host``, a fixed ``--hostname``) each number their
    processes from 1: another container's pid says nothing about the worker, only its heartbeat does."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def stale_reason(record: dict[str, Any], now: float | None = None) -> str | None:
    """Why a claim may be taken over, or None while its worker may still be promoting."""
    if record.get("done"):
        return None
    if record.get("stopped"):
        return "its worker was stopped before it finished"
    if record.get("host") == socket.gethostname() and record.get("ns") == _namespace():
        pid = int(record.get("pid", -1))
        if not _alive(pid):
            return f"its worker (process {pid}) is gone"
        started = record.get("started")
        if started is not None and _started(pid) not in (None, started):
            return f"its worker (process {pid}) is gone: that number now belongs to another process"
    silent = (now or time.time()) - float(record.get("beat", 0))
    if silent > SILENT_SECONDS:
        return f"its worker ({record.get('host')}, process {record.get('pid')}) has been silent for {silent:.0f} s"
    return None


class ClaimLost(Exception):
    """Another worker took this promotion over while it ran: leave the rung (and its files) to that worker."""


class Claim:
    """This worker's claim on one promotion: renews its heartbeat until :meth:`done` or :meth:`stopped`."""

    def __init__(self, storage: RDBStorage, study_id: int, key: str, text: str, taken_over: str | None) -> None:
        self._storage, self._study_id, self.key = storage, study_id, key
        self._text = text
        self.taken_over = taken_over
        """Why the previous claim was taken over (None: this worker was first)."""
        self.lost = False
        self._lock = threading.Lock()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def _update(self, **changes: Any) -> bool:
        with self._lock:
            if self.lost:
                return False
            try:
                text = _swap(self._storage, self._study_id, self.key, self._text, {**json.loads(self._text), **changes})
                if text is None:  # another worker took the claim over (or the database was busy: beat again)
                    self.lost = read_claim(self._storage, self._study_id, self.key) != self._text
                    return False
            except Exception:  # the database is unreachable for a moment: beat again later
                return False
            self._text = text
            return True

    def _run(self) -> None:
        while not self._quit.wait(BEAT_SECONDS) and not self.lost:  # a lost claim's beat ends with it
            self._update(beat=time.time())

    def _end(self) -> None:
        self._quit.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def held(self) -> bool:
        """Whether this worker still holds the claim, read from the database now (not at the last heartbeat).

        Checked before the rung's weights replace what is on disk: a worker that was silent too long (suspended,
        say) and whose promotion another worker took over must not overwrite that worker's file. When the
        database cannot be read, the claim counts as held: recording the rung will tell."""
        with self._lock:
            if self.lost:
                return False
            try:
                self.lost = read_claim(self._storage, self._study_id, self.key) != self._text
            except Exception:
                return True
            return not self.lost

    def done(self) -> None:
        """The promotion's rung is recorded: nobody takes this claim over again."""
        self._end()
        self._update(done=True, beat=time.time())

    def failed(self, message: str) -> None:
        """The promotion failed for a reason a retry would meet again: it is recorded and not tried again."""
        self._end()
        self._update(done=True, failed=message, beat=time.time())

    def stopped(self) -> None:
        """The promotion stopped unfinished (Ctrl-C, an error): a rerun takes it over at once."""
        self._end()
        self._update(stopped=True)


def claim_promotion(storage: RDBStorage, study: optuna.Study, number: int, rung: int) -> Claim | None:
    """Claim promoting trial ``number`` to ``rung``: a :class:`Claim`, or None when another worker holds it."""
    return claim(storage, study, claim_key(number, rung))


def claim(storage: RDBStorage, study: optuna.Study, key: str) -> Claim | None:
    """Claim the work named ``key``: a :class:`Claim`, or None when another worker holds it (or finished it)."""
    old = read_claim(storage, study._study_id, key)
    why = None
    if old is not None:
        why = stale_reason(json.loads(old))
        if why is None:
            return None
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _started(os.getpid()),
        "ns": _namespace(),
        "token": uuid.uuid4().hex,
        "beat": time.time(),
        "every": BEAT_SECONDS,
    }
    text = _swap(storage, study._study_id, key, old, me)
    return None if text is None else Claim(storage, study._study_id, key, text, why)
