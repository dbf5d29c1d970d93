"""Timing on this machine in a process that does nothing else: the search's, ``bench``'s and ``export``'s timer.

A search process trains, lowers and quantizes models between timings, and what that leaves behind
(threads, a large fragmented heap) shifted the ratios it measured: ExecuTorch's sub-millisecond
MobileNetV2 CIFAR candidates timed 3-5% slower against the unpruned model inside a search (and inside
``export``) than ``bench`` measured on the shipped file in a fresh process, in three reruns out of three
(BENCHMARKS.md "Runtimes: reading the numbers"). So every timing goes to one child process, started
once and reused, that imports only the runtime and times with :func:`search.measuring.timing.measure`:
the latency target's timing worker (:mod:`search.measuring.timing_worker`), here without its
memory limit. The reference goes over the pipe once and is kept there, so a timing costs what it did
in-process plus sending the candidate (milliseconds).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import weakref
from pathlib import Path

from search.measuring.hardware import OnThisMachine
from search.measuring.timing import Latency, LatencySettings
from search.measuring.timing_process import TimingFailed, TimingProcess

__all__ = ["IsolatedTimer"]

_LOAD_SECONDS = 300.0
"""Time allowed beyond ``max_seconds`` for loading both models and warming up (ExecuTorch loads take seconds)."""
_ALIVE: weakref.WeakSet[TimingProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for process in list(_ALIVE):
        process.stop()


def _named(model: bytes | str) -> tuple[str, bytes | str]:
    """Bytes by their SHA-256; a file by its path (the child reads it: an IR's ``.xml`` needs its ``.bin``)."""
    if isinstance(model, bytes):
        return hashlib.sha256(model).hexdigest(), model
    path = Path(model).resolve()
    stat = path.stat()
    return f"file:{path}:{stat.st_mtime_ns}:{stat.st_size}", str(path)


class IsolatedTimer(OnThisMachine):
    """A runtime on this machine's CPU, timing in a child process of its own (see the module's docstring).

    Records say ``local``, as :class:`search.measuring.candidate.LocalTimer`'s do: the machine is the same.
    """

    def __init__(self, settings: LatencySettings, process: TimingProcess | None = None) -> None:
        self.settings = settings
        self._process = process or TimingProcess(
            settings.threads, 0, settings.max_seconds + _LOAD_SECONDS, runtime=settings.runtime
        )
        _ALIVE.add(self._process)

    def with_settings(self, settings: LatencySettings) -> IsolatedTimer:
        """The same child process, timing with other rounds (threads and runtime stay)."""
        return IsolatedTimer(dataclasses.replace(settings, threads=self.threads, runtime=self.runtime), self._process)

    @property
    def pid(self) -> int | None:
        """The child process that times (None until the first timing, and after :meth:`close`)."""
        return self._process.pid

    def close(self) -> None:
        """Stop the child (a later timing starts it again)."""
        self._process.stop()

    def __enter__(self) -> IsolatedTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def time(
        self, onnx_model: bytes | str, input_shape: tuple[int, ...], *, reference: bytes | str | None = None
    ) -> Latency:
        fields = {
            f.name: getattr(self.settings, f.name)
            for f in dataclasses.fields(self.settings)
            if f.name not in ("threads", "runtime")
        }
        try:
            return self._process.time(
                list(input_shape),
                _named(onnx_model),
                _named(reference) if reference is not None else None,
                settings=fields,
            )
        except TimingFailed as exc:
            if exc.kind == "model":
                raise RuntimeError(f"{self.runtime} could not time the model: {exc}") from None
            what = "ran out of memory or crashed" if exc.kind == "memory" else "did not finish in time"
            raise RuntimeError(f"the timing process ({self.runtime}) {what} while timing a model") from None
