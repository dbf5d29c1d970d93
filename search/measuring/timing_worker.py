"""The latency target's timing process: ONNX Runtime runs here, under a memory limit, killed past a deadline.

``python -m search.measuring.timing_worker --threads T --max-memory-mb M`` is started by
:class:`search.measuring.timing_process.TimingProcess`. It limits its own address space to
``M`` MiB (``RLIMIT_AS``) before importing ONNX Runtime, so a model whose tensors need more fails
to allocate here, and the service, in another process, answers with a 4xx and keeps serving.
It reads requests from stdin and answers on stdout, one frame each: a 4-byte big-endian length,
a JSON header, then the blobs (model bytes) whose sizes the header lists.

* ``{"op": "inspect"}`` + one model: ``{"ok": true, "inputs": [[dims...], ...]}`` (loads it as an upload is checked).
* ``{"op": "time", "shape": [...], "models": [SHA256, SHA256 or null], "sent": [SHA256, ...]}`` + the
  blobs of the models named in ``sent`` (the others are the ones of the previous timing, kept here,
  so the reference goes over the pipe once): ``{"ok": true, "latency": {...}}`` from
  :func:`search.measuring.timing.measure`, the same timing as the search's (interleaved with the
  reference in this one process). An optional ``"paths"`` object names models by a file this process reads itself
  (key -> path: an OpenVINO IR's ``.xml`` needs its ``.bin`` beside it; the search's own timing process
  only, the service never sends it). An optional ``"settings"`` object overrides fields of
  :class:`search.measuring.timing.LatencySettings` other than threads and runtime (the search's own
  timing process uses it for its quicker probes; the service never sends it).

The search, ``bench`` and ``export`` time in such a process too (:mod:`search.measuring.isolated`,
``--max-memory-mb 0``: no limit), so every timing runs in a process that does nothing else.
* A failure: ``{"ok": false, "kind": "memory" | "model", "error": "one line"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import asdict
from typing import Any, BinaryIO

__all__ = ["read_frame", "write_frame"]

_LENGTH = struct.Struct(">I")
_MEMORY_WORDS = ("allocate memory", "bad_alloc", "out of memory", "cannot allocate")


def write_frame(out: BinaryIO, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> None:
    """One frame: the JSON header (with the blobs' sizes) and the blobs after it."""
    data = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    out.write(_LENGTH.pack(len(data)) + data)
    for blob in blobs:
        out.write(blob)
    out.flush()


def read_frame(source: BinaryIO) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next frame from ``source``, or None at its end."""
    prefix = source.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        return None
    header = json.loads(source.read(_LENGTH.unpack(prefix)[0]))
    blobs = [source.read(size) for size in header.pop("sizes", [])]
    return header, blobs


def _limit_memory(megabytes: int) -> None:
    if megabytes <= 0:  # the search's own timing process: no limit but the machine's
        return
    try:
        import resource
    except ImportError:  # not a POSIX system: the deadline still holds
        return
    limit = megabytes * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _answer(
    header: dict[str, Any], blobs: list[bytes], threads: int, held: dict[str, bytes | str], runtime: str = "onnxruntime"
) -> dict[str, Any]:
    from search.measuring.runtimes.registry import get_runtime
    from search.measuring.timing import LatencySettings, measure

    try:
        if header["op"] == "inspect":
            return {"ok": True, "inputs": [get_runtime(runtime).input_shape(blobs[0])]}
        known: dict[str, bytes | str] = {
            **held,
            **header.get("paths", {}),
            **dict(zip(header["sent"], blobs, strict=True)),
        }
        model_sha, reference_sha = header["models"]
        wanted = {sha: known[sha] for sha in (model_sha, reference_sha) if sha is not None}
        held.clear()
        held.update(wanted)
        reference = held[reference_sha] if reference_sha is not None else None
        settings = LatencySettings(threads=threads, runtime=runtime, **header.get("settings", {}))
        latency = measure(held[model_sha], tuple(header["shape"]), settings, reference=reference)
        return {"ok": True, "latency": asdict(latency)}
    except MemoryError:
        return {"ok": False, "kind": "memory", "error": "out of memory"}
    except Exception as exc:  # onnxruntime raises its own types for models it cannot load or run
        text = str(exc).strip()
        reason = text.splitlines()[0][:300] if text else type(exc).__name__
        memory = any(word in text.lower() for word in _MEMORY_WORDS)
        if memory:  # ONNX Runtime's message ends with what it could not allocate
            reason = text[text.lower().find("failed to allocate") :] if "failed to allocate" in text.lower() else reason
            reason = reason.splitlines()[0][:300]
        return {"ok": False, "kind": "memory" if memory else "model", "error": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.measuring.timing_worker")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-memory-mb", type=int, required=True)
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args(argv)
    _limit_memory(args.max_memory_mb)
    replies = os.fdopen(os.dup(1), "wb")
    requests = sys.stdin.buffer
    from search.measuring.runtimes.registry import get_runtime

    problem = get_runtime(args.runtime).unavailable()  # imports the runtime (under the memory limit)
    if problem is not None:
        write_frame(replies, {"ok": False, "error": f"{args.runtime} cannot be imported ({problem})"})
        return 1
    if args.runtime == "onnxruntime":
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # failures are answered (one line in the service's log), not also printed here
    os.dup2(quiet, 2)
    write_frame(replies, {"ok": True, "ready": True})
    held: dict[str, bytes | str] = {}  # the models of the last timing, by SHA-256
    while (frame := read_frame(requests)) is not None:
        write_frame(replies, _answer(*frame, args.threads, held, args.runtime))
    replies.flush()
    # The caller is gone (end of input). Leave without the runtimes' teardown: two OpenVINO workers whose
    # parent had exited were found hanging at exit, one thread left in a futex wait, holding their memory.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
