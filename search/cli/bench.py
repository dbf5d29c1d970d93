"""``cli.py bench``: measure any model's latency the way the search does, in any runtime.

``--runtime`` picks the runtime (by default the file's: ``.xml`` OpenVINO IR, ``.pte`` ExecuTorch,
anything else ONNX Runtime); OpenVINO also times an ``.onnx`` file, compiled as the search does.

It times through :class:`search.measuring.isolated.IsolatedTimer`, the timer every candidate of a
search is timed with (in a process that does nothing else), so ``bench`` and the search cannot measure
differently.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_target_options(parser)


def runtime_of(path: str, runtime: str | None) -> str:
    """``runtime``, or the runtime a model file of this kind is timed in."""
    return runtime or _RUNTIME_OF_SUFFIX.get(Path(path).suffix.lower(), "onnxruntime")


def _measure(
    onnx: str, reference: str | None, threads: int, timer: Any = None, runtime: str | None = None
) -> tuple[tuple[int, ...], Any]:
    """The batch-1 input shape of ``onnx`` and its latency, timed interleaved with ``reference`` if given.

    ``timer`` is the latency target's (``--target``); by default the model is timed here, in ``runtime``.
    """
    from search.measuring.isolated import IsolatedTimer
    from search.measuring.runtimes.registry import require_runtime
    from search.measuring.timing import LatencySettings

    name = runtime_of(onnx, runtime)
    engine = require_runtime(name)

    def shape_of(path: str) -> tuple[int, ...]:
        if not Path(path).is_file():
            raise UsageError(f"model file {path} does not exist")
        try:
            dims = engine.input_shape(path)
        except Exception as exc:  # each runtime raises its own types for unreadable models
            raise UsageError(f"{path} is not a model {name} can load: {str(exc).splitlines()[0]}") from None
        return tuple(1 if not isinstance(d, int) or d < 1 else d for d in dims)

    shape = shape_of(onnx)
    if reference and shape_of(reference) != shape:
        raise UsageError(f"--reference takes input {shape_of(reference)}, but {onnx} takes {shape}")
    if timer is None:
        timer = IsolatedTimer(LatencySettings(threads=threads, runtime=name))
    elif timer.threads != threads:
        raise UsageError(f"the latency target times with {timer.threads} thread(s); pass --threads {timer.threads}")
    elif timer.runtime != name:
        raise UsageError(f"the latency target times in {timer.runtime}; pass --runtime {timer.runtime}")
    return shape, timer.time(onnx, shape, reference=reference)


def run(args: argparse.Namespace, console: Console) -> int:
    runtime = runtime_of(args.onnx, args.runtime)
    shape, result = _measure(args.onnx, args.reference, args.threads, target_timer(args), runtime)
    record = {
        "onnx": args.onnx,
        "runtime": runtime,
        "measured_on": args.target or "local",
        "input": list(shape),
        "threads": args.threads,
        "median_ms": result.median_ms,
        "p90_ms": result.p90_ms,
        "runs": result.runs,
        "stable": result.stable,
        "reference_median_ms": result.reference_median_ms,
        "ratio": result.ratio,
    }
    if args.format == "json":
        console.print_json(json.dumps(record))
        return 0
    line = (
        f"{args.onnx}: median {result.median_ms:.3f} ms, p90 {result.p90_ms:.3f} ms over {result.runs} runs "
        f"(batch 1, input {list(shape)}, {runtime}, {args.threads} thread(s)"
        f"{'' if result.stable else ', not yet stable'}"
        f"{f', on {args.target}' if args.target else ''})"
    )
    if result.ratio is not None:
        line += f"; reference {result.reference_median_ms:.3f} ms, ratio {result.ratio:.3f}"
    console.print(line)
    return 0
