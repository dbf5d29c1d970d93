"""Is INT8 worth searching on this machine? Measured on the unpruned model, never assumed.

Whether INT8 pays is a property of the CPU (VNNI or AMX make it several times faster; plain
AVX2 may not), of the runtime's INT8 kernels and of the model. So a new study quantizes the
unpruned model, times it in the study's runtime interleaved with FP32 (through
:class:`search.measuring.candidate.CandidateMeter`, like every candidate) and lets the search
choose INT8 only if it is faster by a margin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from search.errors import UsageError
from search.measuring.candidate import CandidateMeter
from search.measuring.quantize import quantization_unavailable
from search.progress import Reporter

__all__ = ["MAX_INT8_RATIO", "Int8Check", "check_int8", "choose_precisions"]

MAX_INT8_RATIO = 0.95
"""INT8 joins the search only if the quantized baseline takes at most this fraction of FP32's time."""


@dataclass(frozen=True)
class Int8Check:
    """Whether INT8 is worth searching on this machine, measured on the unpruned model."""

    available: bool
    """False when quantization is missing or failed (``reason`` says why)."""
    ratio: float | None
    """INT8 baseline median over the FP32 baseline median, timed interleaved; None if not measured."""
    int8_median_ms: float | None
    fp32_median_ms: float | None
    seconds: float
    reason: str = ""

    @property
    def faster(self) -> bool:
        return self.available and self.ratio is not None and self.ratio <= MAX_INT8_RATIO

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "int8_median_ms": None if self.int8_median_ms is None else round(self.int8_median_ms, 4),
            "fp32_median_ms": None if self.fp32_median_ms is None else round(self.fp32_median_ms, 4),
            "max_ratio": MAX_INT8_RATIO,
            "faster": self.faster,
            "seconds": round(self.seconds, 2),
            "reason": self.reason,
        }


def check_int8(
    meter: CandidateMeter,
) -> Int8Check:
    """Quantize the unpruned model and time it interleaved with the FP32 baseline ONNX."""
    started = time.perf_counter()
    missing = quantization_unavailable() if meter.runtime != "executorch" else None  # ExecuTorch quantizes in PT2E
    if missing is not None:
        return Int8Check(False, None, None, None, time.perf_counter() - started, reason=missing)
    try:
        measured = meter.time_onnx(meter.candidate_onnx(meter.baseline, "int8"))
    except Exception as exc:  # any failure of the quantizer means: search FP32 only, and say why
        reason = f"quantizing the baseline failed ({type(exc).__name__}: {exc})".splitlines()[0]
        return Int8Check(False, None, None, None, time.perf_counter() - started, reason=reason)
    return Int8Check(
        available=True,
        ratio=measured.ratio,
        int8_median_ms=measured.median_ms,
        fp32_median_ms=measured.reference_median_ms,
        seconds=time.perf_counter() - started,
    )


def choose_precisions(
    allowed: tuple[str, ...],
    meter: CandidateMeter,
    reporter: Reporter,
) -> tuple[tuple[str, ...], Int8Check | None]:
    """The precisions a new study searches: ``allowed`` without int8 unless INT8 is measured faster here.

    Says once (a warning) when int8 is dropped; a search that allowed only int8 cannot drop it
    and raises :class:`UsageError` instead.
    """
    if "int8" not in allowed:
        return allowed, None
    reporter.phase("quantize the baseline to INT8 and time it")
    check = check_int8(meter)
    if check.faster:
        assert check.ratio is not None
        reporter.info(
            f"INT8 baseline: {check.int8_median_ms:.2f} ms, {check.ratio:.0%} of FP32 timed alongside it "
            f"({check.fp32_median_ms:.2f} ms); the search may quantize"
        )
        return allowed, check
    if check.available:
        why = (
            f"the INT8 baseline takes {check.ratio:.0%} of FP32's time in {meter.runtime} on this CPU "
            f"(needs <= {MAX_INT8_RATIO:.0%})"
        )
    else:
        why = check.reason
    kept = tuple(p for p in allowed if p != "int8")
    if not kept:
        raise UsageError(f"INT8 is not worth searching here: {why}; use --precision fp32 or fp32,int8")
    reporter.warn(f"INT8 is not searched: {why}; searching {', '.join(kept)} only")
    return kept, check
