"""The latency measurements a study's set-up makes, each counted by its clock (:mod:`search.study.creation_clock`)."""

from __future__ import annotations

from typing import Any

from search.measuring.candidate import CandidateMeter
from search.pruning.policy import Policy
from search.pruning.recipes import Measured
from search.study.creation_clock import CreationClock
from search.study.sensitivity import probe_record_of

__all__ = ["clocked_measured"]


def clocked_measured(
    meter: CandidateMeter, clock: CreationClock, known: dict[str, dict[str, Any]] | None = None
) -> Measured:
    """:class:`search.pruning.recipes.Measured` timing with ``meter`` (searching with its quick probes, where it
    has them: a latency target keeps its own timing), each measurement counted in the clock's current phase;
    ``known`` are records measured before."""
    assert meter.baseline_ms is not None

    def record_of(policy: Policy) -> dict[str, Any]:
        clock.count()  # each phase's line says how many latency measurements it took
        return meter.record(policy)

    quick = probe_record_of(meter)

    def probe_of(policy: Policy) -> dict[str, Any]:
        assert quick is not None
        clock.count(probe=True)
        return quick(policy)

    return Measured(record_of, meter.baseline_ms, probe_of if quick is not None else None, known=known)
