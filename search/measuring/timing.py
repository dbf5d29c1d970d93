"""Measured CPU latency in a runtime (ONNX Runtime by default): batch 1, a fixed number of threads.

Latency is always measured, never estimated. Timing follows the usual discipline: export,
warm up, then time in rounds until the median stops moving (or a time cap is reached), and
report median and p90. Because this kind of machine drifts by 10-15% between runs minutes
apart, a candidate can be timed *interleaved* with a reference model (the unpruned baseline):
one run of each in turn, so both see the same machine state, and their ratio is what the
budget is judged on.

The runtime (:mod:`search.measuring.runtimes`: ONNX Runtime, OpenVINO or ExecuTorch) only loads
the model and runs a batch; the discipline above is this module's, the same for every runtime.
This module needs only numpy and the runtime's package (no torch for ONNX Runtime and OpenVINO),
so the same timing runs on a device where PyTorch is not installed. Callers time candidates
through :mod:`search.measuring.candidate`.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search.errors import UsageError
from search.measuring.runtimes.base import Run
from search.measuring.runtimes.onnxruntime import open_session
from search.measuring.runtimes.registry import DEFAULT_RUNTIME, require_runtime

__all__ = [
    "DEFAULT_MIN_SECONDS",
    "MIN_SECONDS_ENV",
    "Latency",
    "LatencySettings",
    "default_min_seconds",
    "measure",
    "open_session",
]

DEFAULT_MIN_SECONDS = 1.0
"""How long every timing lasts at least (``benchmarks/timing_floor.py``: fresh-process timings of the same
sub-millisecond pair spread 7-10% without it in ONNX Runtime, about 3% with 1 s; 2 s bought no more)."""
MIN_SECONDS_ENV = "PRUNE_SEARCH_MIN_TIMING_S"
"""Environment variable that overrides :data:`DEFAULT_MIN_SECONDS` (0 turns the floor off)."""


def default_min_seconds() -> float:
    """:data:`DEFAULT_MIN_SECONDS`, or the seconds :data:`MIN_SECONDS_ENV` sets."""
    raw = os.environ.get(MIN_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10:
        raise UsageError(f"{MIN_SECONDS_ENV}={raw!r} must be seconds from 0 to 10 (e.g. 1); unset it for the default")
    return value


@dataclass(frozen=True)
class LatencySettings:
    threads: int = 1
    """The runtime's threads (the deployment target's, usually 1 on edge CPUs)."""
    runtime: str = DEFAULT_RUNTIME
    """Which runtime times: ``onnxruntime``, ``openvino`` or ``executorch`` (:mod:`search.measuring.runtimes`)."""
    warmup: int = 10
    """Untimed runs per model before timing starts."""
    round_size: int = 10
    """Timed runs per model in one round; rounds repeat until the median is stable."""
    min_rounds: int = 3
    tolerance: float = 0.02
    """The median is stable when a new round moves it by less than this fraction."""
    min_seconds: float = field(default_factory=default_min_seconds)
    """Keep adding rounds until this long has been timed, even when the median is already stable.

    A sub-millisecond model meets ``min_rounds`` in a few dozen milliseconds, shorter than one time
    slice of a busy machine, so a single preemption or frequency step decides its ratio.
    """
    max_seconds: float = 30.0
    """Stop adding rounds after this long, stable or not (the result says which)."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 <= self.min_seconds <= self.max_seconds:
            raise ValueError("min_seconds must lie between 0 and max_seconds")


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    stable: bool
    reference_median_ms: float | None = None
    """The reference model's median, timed interleaved with this one."""
    reference_p90_ms: float | None = None

    @property
    def ratio(self) -> float | None:
        """This model's median over the interleaved reference's median (drift cancels out)."""
        if self.reference_median_ms is None:
            return None
        return self.median_ms / self.reference_median_ms

    def record(self, baseline_latency_ms: float, threads: int, precision: str) -> dict[str, Any]:
        """What a trial stores: this measurement, its ratio, and the drift-corrected latency.

        The corrected figure (ratio times the study's ``baseline_latency_ms``) is what a budget
        is judged on. Needs an interleaved reference.
        """
        ratio = self.ratio
        if ratio is None:
            raise ValueError("a latency record needs a measurement interleaved with the baseline")
        return {
            "median_ms": round(self.median_ms, 4),
            "p90_ms": round(self.p90_ms, 4),
            "baseline_median_ms": round(self.reference_median_ms or 0.0, 4),
            "ratio": round(ratio, 5),
            "corrected_ms": round(ratio * baseline_latency_ms, 4),
            "runs": self.runs,
            "stable": self.stable,
            "threads": threads,
            "precision": precision,
        }


def _runner(run: Run, shape: tuple[int, ...]):
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def timed() -> float:
        start = time.perf_counter()
        run(batch)
        return (time.perf_counter() - start) * 1000.0

    return timed


def measure(
    model: bytes | str,
    input_shape: tuple[int, ...],
    settings: LatencySettings,
    *,
    reference: bytes | str | None = None,
) -> Latency:
    """Time ``model`` (and, interleaved, ``reference``) on inputs of ``input_shape`` in ``settings.runtime``.

    Both are files of that runtime (ONNX for ONNX Runtime and OpenVINO, ``.pte`` for ExecuTorch).
    """
    runtime = require_runtime(settings.runtime)
    candidate = _runner(runtime.load(model, settings.threads), input_shape)
    ref = _runner(runtime.load(reference, settings.threads), input_shape) if reference is not None else None
    for _ in range(settings.warmup):
        candidate()
        if ref is not None:
            ref()
    times: list[float] = []
    ref_times: list[float] = []
    medians: list[float] = []
    stable = False
    start = time.perf_counter()
    while True:
        for _ in range(settings.round_size):
            times.append(candidate())
            if ref is not None:
                ref_times.append(ref())
        value = statistics.median(times)
        if ref is not None:
            value /= statistics.median(ref_times)
        medians.append(value)
        if len(medians) >= settings.min_rounds:
            recent = medians[-2:]
            stable = abs(recent[1] - recent[0]) <= settings.tolerance * recent[0]
            elapsed = time.perf_counter() - start
            if (stable and elapsed >= settings.min_seconds) or elapsed > settings.max_seconds:
                break
    return Latency(
        median_ms=statistics.median(times),
        p90_ms=float(np.percentile(times, 90)),
        runs=len(times),
        stable=stable,
        reference_median_ms=statistics.median(ref_times) if ref_times else None,
        reference_p90_ms=float(np.percentile(ref_times, 90)) if ref_times else None,
    )
