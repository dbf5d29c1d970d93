"""The service's side of its timing process: every ONNX Runtime call, bounded in memory and in time.

The service loads and times models in one child process
(:mod:`search.measuring.timing_worker`), started once and reused, so timings cost no more
than in-process ones (the models travel over a pipe; the timing itself, baseline interleaved, is
:func:`search.measuring.timing.measure` in that one process). The child's address space is
limited to ``max_memory_mb``; a whole call (loading, warm-up, every run) that takes longer than
``max_seconds`` is killed. Either way :class:`TimingFailed` says which bound, the child is
started again, and the service keeps serving.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import weakref
from io import BytesIO
from typing import Any

from search.measuring.timing import Latency
from search.measuring.timing_worker import read_frame, write_frame

__all__ = ["TimingFailed", "TimingProcess", "default_memory_mb"]

STARTUP_S = 120.0
"""How long the child may take to import ONNX Runtime (not counted against a timing)."""


class TimingFailed(Exception):
    """A call the child could not complete; ``kind`` is ``memory``, ``time`` or ``model``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Late(Exception):
    pass


def default_memory_mb() -> int:
    """Half of this machine's memory, at most 8 GiB (in MiB)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024**2
    except (ValueError, OSError, AttributeError):
        return 4096
    return int(min(8192, max(512, physical // 2)))


class TimingProcess:
    """One child that loads and times models; not thread-safe (the service calls it under its device lock)."""

    def __init__(self, threads: int, max_memory_mb: int, max_seconds: float, runtime: str = "onnxruntime") -> None:
        self.threads = threads
        self.runtime = runtime
        self.max_memory_mb = max_memory_mb
        self.max_seconds = max_seconds
        self._child: subprocess.Popen[bytes] | None = None
        self._held: set[str] = set()
        """The models the child keeps from its last timing (not sent again)."""

    def start(self) -> None:
        """Start the child (if none runs) and wait until it has imported ONNX Runtime."""
        if self._child is not None and self._child.poll() is None:
            return
        argv = [sys.executable, "-m", "search.measuring.timing_worker"]
        argv += ["--threads", str(self.threads), "--max-memory-mb", str(self.max_memory_mb), "--runtime", self.runtime]
        self._child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        weakref.finalize(self, _kill, self._child)  # a process object dropped without stop() takes its child along
        self._held = set()
        try:
            ready = self._read(time.monotonic() + STARTUP_S)
        except (_Late, EOFError) as exc:
            status = self.stop()
            raise RuntimeError(f"the timing process did not start ({exc or 'exit status ' + str(status)})") from None
        if not ready.get("ready"):
            raise RuntimeError(f"the timing process did not start: {ready.get('error') or ready}")

    @property
    def pid(self) -> int | None:
        """The running child's process id (None when none runs)."""
        return self._child.pid if self._child is not None and self._child.poll() is None else None

    def stop(self) -> int | None:
        """Kill the child; its exit status."""
        child, self._child = self._child, None
        if child is None:
            return None
        if child.poll() is None:
            child.kill()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        return child.wait()

    def inspect(self, model: bytes) -> list[list[int | str]]:
        """The model's input shapes, as ONNX Runtime loads it."""
        return self._call({"op": "inspect"}, (model,))["inputs"]

    def time(
        self,
        shape: list[int],
        model: tuple[str, bytes | str],
        reference: tuple[str, bytes | str] | None,
        settings: dict[str, Any] | None = None,
    ) -> Latency:
        """``model`` (and ``reference``), each as (key, bytes or a path the child reads itself, e.g. an IR's
        ``.xml`` beside its ``.bin``), timed on inputs of ``shape``; ``settings`` overrides
        :class:`search.measuring.timing.LatencySettings` fields other than threads and runtime."""
        self.start()
        named = [model] if reference is None else [model, reference]
        sent = [(key, data) for key, data in named if key not in self._held and isinstance(data, bytes)]
        paths = {key: data for key, data in named if isinstance(data, str)}
        header: dict[str, Any] = {
            "op": "time",
            "shape": shape,
            "models": [model[0], reference[0] if reference else None],
        }
        if paths:
            header["paths"] = paths
        if settings:
            header["settings"] = settings
        self._held = set()  # until the child answers
        answer = self._call({**header, "sent": [key for key, _ in sent]}, tuple(data for _, data in sent))
        self._held = {key for key, _ in named}
        return Latency(**answer["latency"])

    def _call(self, header: dict[str, Any], blobs: tuple[bytes, ...]) -> dict[str, Any]:
        self.start()
        assert self._child is not None and self._child.stdin is not None
        started = time.monotonic()
        try:
            write_frame(self._child.stdin, header, blobs)
            answer = self._read(started + self.max_seconds)
        except _Late:
            self.stop()
            self.start()
            raise TimingFailed(
                "time",
                f"it took longer than this target's limit of {self.max_seconds:g} s for a whole timing (loading, "
                "warm-up and runs), and was stopped; start the target with a larger --max-timing-s for models "
                "this slow",
            ) from None
        except (EOFError, OSError):
            status = self.stop()
            self.start()
            how = f"signal {-status}" if status is not None and status < 0 else f"exit status {status}"
            raise TimingFailed(
                "memory",
                f"the timing process ended ({how}) while running it; it needs more memory than this target's "
                f"limit of {self.max_memory_mb} MiB (--max-memory-mb) or crashed ONNX Runtime",
            ) from None
        if answer.get("ok"):
            return answer
        self._held = set()  # send them again next time, whatever the child kept
        if answer.get("kind") == "memory":
            raise TimingFailed(
                "memory",
                f"it needs more memory than this target's limit of {self.max_memory_mb} MiB for a timing "
                f"(--max-memory-mb): {answer.get('error')}",
            )
        raise TimingFailed("model", str(answer.get("error")))

    def _read(self, deadline: float) -> dict[str, Any]:
        """The child's next answer, or :class:`_Late` past ``deadline``."""
        assert self._child is not None and self._child.stdout is not None
        allowed = deadline - time.monotonic()  # the limit the caller set: a timing's, or the start-up's
        fd = self._child.stdout.fileno()
        data = bytearray()
        while True:
            frame = _complete_frame(data)
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Late(f"no answer within {allowed:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError("the timing process ended")
            data += chunk


def _kill(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def _complete_frame(data: bytearray) -> dict[str, Any] | None:
    if len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        return None
    frame = read_frame(BytesIO(bytes(data)))
    return frame[0] if frame is not None else None
