"""``cli.py bench``: measure any ONNX model's latency the way the search does.

It times through :class:`search.measuring.candidate.LocalTimer`, the timer every candidate of a
search is timed with, so ``bench`` and the search cannot measure differently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from search.cli.options import add_target_options, positive_int, target_timer
from search.errors import UsageError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "measure any ONNX model's latency the way the search does"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="path to a .onnx file")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reference", help="another .onnx to time interleaved with it (e.g. the unpruned model)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_target_options(parser)


def _measure(onnx: str, reference: str | None, threads: int, timer: Any = None) -> tuple[tuple[int, ...], Any]:
    """The batch-1 input shape of ``onnx`` and its latency, timed interleaved with ``reference`` if given.

    ``timer`` is the latency target's (``--target``); by default the model is timed here.
    """
    from search.measuring.candidate import LocalTimer
    from search.measuring.timing import LatencySettings, open_session

    def shape_of(path: str) -> tuple[int, ...]:
        if not Path(path).is_file():
            raise UsageError(f"ONNX file {path} does not exist")
        try:
            dims = open_session(path, 1).get_inputs()[0].shape
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise UsageError(f"{path} is not a model ONNX Runtime can load: {str(exc).splitlines()[0]}") from None
        return tuple(1 if not isinstance(d, int) else d for d in dims)

    shape = shape_of(onnx)
    if reference and shape_of(reference) != shape:
        raise UsageError(f"--reference takes input {shape_of(reference)}, but {onnx} takes {shape}")
    if timer is None:
        timer = LocalTimer(LatencySettings(threads=threads))
    elif timer.threads != threads:
        raise UsageError(f"the latency target times with {timer.threads} thread(s); pass --threads {timer.threads}")
    return shape, timer.time(onnx, shape, reference=reference)


def run(args: argparse.Namespace, console: Console) -> int:
    shape, result = _measure(args.onnx, args.reference, args.threads, target_timer(args))
    record = {
        "onnx": args.onnx,
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
        f"(batch 1, input {list(shape)}, {args.threads} thread(s){'' if result.stable else ', not yet stable'}"
        f"{f', on {args.target}' if args.target else ''})"
    )
    if result.ratio is not None:
        line += f"; reference {result.reference_median_ms:.3f} ms, ratio {result.ratio:.3f}"
    console.print(line)
    return 0
