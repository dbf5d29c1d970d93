"""Measuring a candidate: the one place the tool times a model.

policy -> pruned model -> the runtime's file (ONNX, or an ExecuTorch program; FP32, or INT8 when
the policy says so) -> a latency record,
timed interleaved with the unpruned model so machine drift cancels, with a record reused for an
identical architecture instead of timing it again.

Two layers:

* a :class:`Timer` times model files of one runtime (:mod:`search.measuring.runtimes`), one against
  a reference, on one machine. :class:`LocalTimer` does it here with :func:`search.measuring.timing.measure`;
  :class:`search.latency_service.client.RemoteTimer` does it on the device that will run the model,
  through ``cli.py target`` there.
* a :class:`CandidateMeter` is what everything else calls: study creation (the baseline, the INT8
  check, the fastest policy, the recipes), budget fitting, trials, export and ``bench``. It owns the
  study's reference (the baseline's file in the timer's runtime and its latency) and turns timings into the records that
  trials store (:meth:`search.measuring.timing.Latency.record`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from torch import nn

from search.data.dataset import Dataset
from search.measuring.hardware import OnThisMachine
from search.measuring.quantize import QuantizeSettings
from search.measuring.runtimes.lowering import timed_file
from search.measuring.runtimes.registry import DEFAULT_RUNTIME
from search.measuring.timing import Latency, LatencySettings, measure
from search.progress import NullReporter, Reporter
from search.pruning.channels import prune_copy
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace

__all__ = ["CandidateMeter", "Known", "LocalTimer", "Timed", "Timer"]


class Timer(Protocol):
    """Times models at batch 1 on one machine, exactly as :func:`search.measuring.timing.measure` does."""

    @property
    def threads(self) -> int:
        """The runtime's threads the timings use."""
        ...

    @property
    def runtime(self) -> str:
        """The runtime that times (:data:`search.measuring.runtimes.registry.RUNTIME_NAMES`)."""
        ...

    @property
    def where(self) -> str:
        """Where the timings are taken: ``local``, or the latency target's URL (each record says so)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """The hardware fingerprint of the machine that times (a study's latencies share one)."""
        ...

    def time(
        self, onnx_model: bytes | str, input_shape: tuple[int, ...], *, reference: bytes | str | None = None
    ) -> Latency:
        """Time ``onnx_model`` (and, interleaved with it, ``reference``) on inputs of ``input_shape``."""
        ...


@dataclass(frozen=True)
class LocalTimer(OnThisMachine):
    """A runtime (``settings.runtime``, ONNX Runtime by default) on this machine's CPU, timed in this process."""

    settings: LatencySettings

    def with_settings(self, settings: LatencySettings) -> LocalTimer:
        """This timer with other rounds (threads and runtime stay)."""
        return LocalTimer(replace(settings, threads=self.threads, runtime=self.runtime))

    def time(
        self, onnx_model: bytes | str, input_shape: tuple[int, ...], *, reference: bytes | str | None = None
    ) -> Latency:
        return measure(onnx_model, input_shape, self.settings, reference=reference)


@dataclass(frozen=True)
class Timed:
    """A candidate's latency record and the seconds spent quantizing it on the way (INT8 only)."""

    record: dict[str, Any]
    quantize_seconds: float = 0.0


@dataclass(frozen=True)
class Known:
    """A latency record measured before, usable for a model of the same architecture and precision."""

    arch_hash: str | None
    precision: str
    record: dict[str, Any]
    """The record as stored (without ``arch_hash``)."""
    note: dict[str, Any]
    """What a reusing trial adds to it: where it was measured (``measured_at``) or ``reused_from_trial``."""


class CandidateMeter:
    """Latency records of candidates, each timed interleaved with the unpruned model in the timer's runtime.

    ``baseline_ms`` is the study's reference latency for the unpruned model (measured alone when
    the study was created, :meth:`time_baseline`): a record's ``corrected_ms`` is the candidate's
    ratio to the interleaved baseline times it, and that is what a budget is judged on.
    """

    def __init__(
        self,
        baseline: nn.Module,
        data: Dataset,
        *,
        space: SearchSpace | None = None,
        timer: Timer | None = None,
        quantize: QuantizeSettings | None = None,
        baseline_ms: float | None = None,
        baseline_onnx: bytes | None = None,
    ) -> None:
        self.baseline = baseline
        self.data = data
        self.space = space
        self.timer: Timer = timer or LocalTimer(LatencySettings())
        self.quantize = quantize or QuantizeSettings()
        self.baseline_onnx = baseline_onnx if baseline_onnx is not None else self.candidate_onnx(baseline, "fp32")
        """The unpruned model's file in the runtime (ONNX, or ``.pte`` for ExecuTorch): the reference."""
        self.baseline_ms = baseline_ms

    @property
    def threads(self) -> int:
        return self.timer.threads

    @property
    def runtime(self) -> str:
        return getattr(self.timer, "runtime", DEFAULT_RUNTIME)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.example_input().shape)

    # -- timing model files ------------------------------------------------------------------

    def time_baseline(self) -> Latency:
        """The unpruned model alone: the study's reference latency."""
        return self.timer.time(self.baseline_onnx, self.input_shape)

    def time_onnx(self, onnx_model: bytes | str) -> Latency:
        """A model file of the study's input in the runtime, timed interleaved with the unpruned model."""
        return self.timer.time(onnx_model, self.input_shape, reference=self.baseline_onnx)

    def record_of(self, latency: Latency, precision: str) -> dict[str, Any]:
        """What a trial stores about ``latency`` (see :meth:`Latency.record`), and where it was measured."""
        if self.baseline_ms is None:
            raise ValueError("the study's baseline latency is not known yet: call time_baseline first")
        record = {**latency.record(self.baseline_ms, self.threads, precision), "measured_on": self.timer.where}
        if self.runtime != DEFAULT_RUNTIME:  # records of the default runtime stay as they always were
            record["runtime"] = self.runtime
        return record

    # -- timing PyTorch models ---------------------------------------------------------------

    def candidate_onnx(self, model: nn.Module, precision: str) -> bytes:
        """The file that is timed for ``model`` in ``precision`` in the timer's runtime (batch 1; INT8 quantized
        for timing): ONNX for ONNX Runtime and OpenVINO, an ExecuTorch program for ExecuTorch."""
        return timed_file(self.runtime, model, self.data, precision, self.quantize)

    def time_model(self, model: nn.Module, precision: str, reporter: Reporter | None = None) -> Timed:
        """``model`` exported (quantized for ``int8``) and timed: its latency record."""
        reporter = reporter or NullReporter()
        quantize_seconds = 0.0
        if precision == "int8":
            reporter.phase("quantize")
            started = time.perf_counter()
            onnx_model = self.candidate_onnx(model, precision)
            quantize_seconds = time.perf_counter() - started
            reporter.phase("latency")
        else:
            onnx_model = self.candidate_onnx(model, precision)
        return Timed(self.record_of(self.time_onnx(onnx_model), precision), quantize_seconds)

    def time_pruned(
        self,
        model: nn.Module,
        arch_hash: str,
        precision: str,
        known: Iterable[Known] = (),
        reporter: Reporter | None = None,
    ) -> Timed:
        """A pruned model's record: the first of ``known`` with its architecture and precision, or a new timing.

        A policy picked because a measurement said it meets the budget is judged by that
        measurement (``known`` lists it first), not by a second one that drift may put on the
        other side; an architecture timed before is not timed again.
        """
        for candidate in known:
            if candidate.arch_hash == arch_hash and candidate.precision == precision:
                record = {k: v for k, v in candidate.record.items() if k != "arch_hash"}
                return Timed({**record, **candidate.note})
        return self.time_model(model, precision, reporter)

    # -- timing policies ---------------------------------------------------------------------

    def records(self, policy: Policy, precisions: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``policy`` applied to a copy of the baseline (pruned once), timed in each of ``precisions``.

        Each record carries the pruned model's ``arch_hash``, so a trial of that architecture can
        reuse it.
        """
        if self.space is None:
            raise ValueError("timing a policy needs the search space it was drawn from")
        pruned = prune_copy(self.baseline, policy, self.space, self.data)
        return {
            precision: {**self.time_model(pruned.model, precision).record, "arch_hash": pruned.arch_hash}
            for precision in precisions
        }

    def record(self, policy: Policy) -> dict[str, Any]:
        """``policy``'s latency record in its own precision (with ``arch_hash``)."""
        return self.records(policy, (policy.precision,))[policy.precision]
