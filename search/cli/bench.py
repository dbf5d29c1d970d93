"""``cli.py bench``: measure any model's latency the way the search does, in any runtime.

``--runtime`` picks the runtime (by default the file's: ``.xml`` OpenVINO IR, ``.pte`` ExecuTorch,
anything else ONNX Runtime); OpenVINO also times an ``.onnx`` file, compiled as the search does.

It times through :class:`search.measuring.isolated.IsolatedTimer`, the timer every candidate of a
search is timed with (in a process that does nothing else), so ``bench`` and the search cannot measure
differently.

``--repeat N`` times it in N fresh timing processes and reports the median over them with their spread:
on sub-millisecond models a ratio moves by a few percent from one process to the next (BENCHMARKS.md
"Runtimes: reading the numbers"), which one timing cannot show.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console

from search.cli.options import add_runtime_option, add_target_options, positive_int, target_timer
from search.errors import UsageError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "measure any model's latency (ONNX, OpenVINO IR, ExecuTorch .pte) the way the search does"

_RUNTIME_OF_SUFFIX = {".xml": "openvino", ".pte": "executorch"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "onnx", metavar="MODEL", help="path to a .onnx file (or model.xml for OpenVINO, .pte for ExecuTorch)"
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reference", help="another model to time interleaved with it (e.g. the unpruned model)")
    add_runtime_option(parser, "the runtime to time in (default: the file's: .xml openvino, .pte executorch)")
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        help="time it this many times, each in a fresh timing process (on --target: that many requests), and "
        "report the median with the spread (default: 1)",
    )
    parser.add_argument(
        "--input-size",
        type=positive_int,
        help="the height and width to time a model at whose input size is left open (exported for several sizes)",
    )
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_target_options(parser)


def runtime_of(path: str, runtime: str | None) -> str:
    """``runtime``, or the runtime a model file of this kind is timed in."""
    return runtime or _RUNTIME_OF_SUFFIX.get(Path(path).suffix.lower(), "onnxruntime")


def _measure(
    onnx: str,
    reference: str | None,
    threads: int,
    timer: Any = None,
    runtime: str | None = None,
    repeat: int = 1,
    input_size: int | None = None,
) -> tuple[tuple[int, ...], Any]:
    """The batch-1 input shape of ``onnx`` and its latency, timed interleaved with ``reference`` if given.

    ``timer`` is the latency target's (``--target``); by default the model is timed here, in ``runtime``, in a
    fresh timing process. With ``repeat`` > 1 the latency is a list of ``repeat`` timings, each in a fresh
    process (on a target: ``repeat`` requests); the files are checked once.
    """
    from search.measuring.isolated import IsolatedTimer
    from search.measuring.runtimes.registry import require_runtime
    from search.measuring.timing import LatencySettings

    name = runtime_of(onnx, runtime)
    engine = require_runtime(name)

    def shape_of(path: str) -> tuple[int, ...]:
        if not Path(path).is_file():
            raise UsageError(f"model file {path} does not exist")
        if Path(path).suffix.lower() == ".xml" and not Path(path).with_suffix(".bin").is_file():
            weights = Path(path).with_suffix(".bin")
            raise UsageError(f"{path} is an OpenVINO IR without its weights: {weights} is missing")
        try:
            dims = engine.input_shape(path)
        except Exception as exc:  # each runtime raises its own types for unreadable models
            raise UsageError(f"{path} is not a model {name} can load: {_reason(exc)}") from None
        return _fixed(path, dims, input_size)

    shape = shape_of(onnx)
    if reference and (reference_shape := shape_of(reference)) != shape:
        raise UsageError(f"--reference takes input {reference_shape}, but {onnx} takes {shape}")
    if timer is not None and timer.threads != threads:
        raise UsageError(f"the latency target times with {timer.threads} thread(s); pass --threads {timer.threads}")
    if timer is not None and timer.runtime != name:
        raise UsageError(f"the latency target times in {timer.runtime}; pass --runtime {timer.runtime}")

    def once() -> Any:
        if timer is not None:
            return timer.time(onnx, shape, reference=reference)
        with IsolatedTimer(LatencySettings(threads=threads, runtime=name)) as fresh:  # each repeat: a fresh process
            return fresh.time(onnx, shape, reference=reference)

    try:
        timings = [once() for _ in range(repeat)]
    except RuntimeError as exc:  # the runtime refused to run the file: the user's model, not this machine
        if "could not time the model" not in str(exc):
            raise
        raise UsageError(f"{exc}; bench times a model with one float image input (N, C, H, W)") from None
    return shape, timings if repeat > 1 else timings[0]


def _reason(exc: Exception) -> str:
    """The line of a runtime's error that says what is wrong (OpenVINO's first names only its own source file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if not re.match(r"^(Exception from )?src/\S+:\d+:?$", line)]
    return (told or lines or [type(exc).__name__])[0]


def _fixed(path: str, dims: list[int | str], input_size: int | None) -> tuple[int, ...]:
    """The batch-1 shape to time ``path`` at: an open batch is 1, open height and width are ``input_size``."""

    def is_open(d: int | str) -> bool:
        return not isinstance(d, int) or d < 1

    named = ", ".join(f"{i} ({d})" for i, d in enumerate(dims) if i > 0 and is_open(d))
    if (len(dims) == 4 and is_open(dims[1])) or (len(dims) != 4 and named):
        raise UsageError(f"{path} leaves input dimension(s) {named} open; export it with a fixed input shape")
    if named and input_size is None:
        raise UsageError(
            f"{path} leaves its input's height and width open ({named}); pass --input-size N to time it at N x N"
        )
    return tuple(1 if i == 0 and is_open(d) else input_size if is_open(d) else d for i, d in enumerate(dims))


def _spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the repeats came out."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def run(args: argparse.Namespace, console: Console) -> int:
    runtime = runtime_of(args.onnx, args.runtime)
    shape, timed = _measure(
        args.onnx, args.reference, args.threads, target_timer(args), runtime, args.repeat, args.input_size
    )
    timings = timed if args.repeat > 1 else [timed]
    medians = [t.median_ms for t in timings]
    ratios = [t.ratio for t in timings if t.ratio is not None]
    median_ms = statistics.median(medians)
    ratio = statistics.median(ratios) if ratios else None
    reference_ms = statistics.median([t.reference_median_ms for t in timings]) if ratios else None
    record = {
        "onnx": args.onnx,
        "runtime": runtime,
        "measured_on": args.target or "local",
        "input": list(shape),
        "threads": args.threads,
        "median_ms": median_ms,
        "p90_ms": statistics.median([t.p90_ms for t in timings]),
        "runs": sum(t.runs for t in timings),
        "stable": all(t.stable for t in timings),
        "reference_median_ms": reference_ms,
        "ratio": ratio,
        "repeats": len(timings),
    }
    if args.repeat > 1:
        record["repeat_median_ms"] = medians
        record["repeat_ratios"] = ratios or None
        record["spread"] = round(_spread(ratios if ratios else medians), 4)
    if args.format == "json":
        console.print_json(json.dumps(record))
        return 0
    over = f"over {record['runs']} runs" if args.repeat == 1 else f"median of {args.repeat} processes"
    line = (
        f"{args.onnx}: median {median_ms:.3f} ms, p90 {record['p90_ms']:.3f} ms {over} "
        f"(batch 1, input {list(shape)}, {runtime}, {args.threads} thread(s)"
        f"{'' if record['stable'] else ', not yet stable'}"
        f"{f', on {args.target}' if args.target else ''})"
    )
    if ratio is not None:
        line += f"; reference {reference_ms:.3f} ms, ratio {ratio:.3f}"
    if args.repeat > 1:
        what = "ratios" if ratios else "medians"
        values = ratios if ratios else medians
        line += (
            f"; {what} of the {args.repeat} timings {min(values):.3f}-{max(values):.3f} (spread {record['spread']:.1%})"
        )
    console.print(line)
    return 0
