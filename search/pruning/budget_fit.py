"""Fit a sampled policy to the latency budget: keep its shape, choose its strength by measurement.

The sampler proposes per-stage ratios from the whole space. At a tight budget most proposals
miss it (at 8% of the baseline, 20 of 36 in one study), and many that meet it leave much of the
budget unused, which costs accuracy. With ``--fit-budget`` a sampled policy is read as a
*shape*: at strength ``s`` every stage keeps ``(1 - r) ** s`` of the channels the sample keeps
at ``r`` (``s = 1`` is the sample itself; a stage the sample leaves alone stays alone), and the
strength is found by bisection on measured latency, so that the trial runs the least pruned
policy of its shape that meets the budget. AMC constrains its agent's actions to the budget in
the same spirit. Criteria, rounding and precision stay as sampled; the bisection probes (quick
timings) and the full timing of its answer is the trial's latency record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search.pruning.policy import Policy
from search.pruning.recipes import Measured, budget_matched, distinct
from search.pruning.space import SearchSpace

__all__ = ["STRENGTHS", "Fit", "fit_to_budget", "strength_grid"]

STRENGTHS = tuple(2 ** (k / 4) for k in range(-8, 13))
"""Strengths tried, 0.25 to 8 in steps of 2**(1/4); snapped to the space's grid, neighbours often coincide."""


@dataclass(frozen=True)
class Fit:
    policy: Policy
    strength: float
    latency: dict[str, Any]
    """The latency record (with ``arch_hash``) of ``policy``: the measurement that chose it."""
    measured: list[dict[str, Any]]
    """Every strength measured on the way, with its latency over the baseline's and how it was timed:
    ``{"strength", "ratio", "how": "probe" | "full"}``."""

    def summary(self, sampled: Policy) -> dict[str, Any]:
        """What a trial records about its fit (user attribute ``budget_fit``)."""
        return {
            "sampled": sampled.to_dict(),
            "sampled_describe": sampled.describe(),
            "strength": round(self.strength, 4),
            "measured": self.measured,
        }


def strength_grid(space: SearchSpace, policy: Policy) -> list[tuple[float, Policy]]:
    """``policy``'s shape at every strength of :data:`STRENGTHS`, least pruned first (distinct, never unpruned)."""
    criteria = {name: stage.criterion for name, stage in policy.stages.items()}
    grid = []
    for s in STRENGTHS:
        fractions = {
            name: (1 - (1 - stage.stream) ** s, 1 - (1 - stage.inner) ** s) for name, stage in policy.stages.items()
        }
        scaled = space.allocated(fractions, criteria, policy.precision, policy.round_to)
        grid.append((s, dataclasses.replace(scaled, seed=policy.seed)))
    return distinct(space, [(s, p) for s, p in grid if not p.is_unpruned])


def fit_to_budget(
    policy: Policy,
    space: SearchSpace,
    budget_ms: float,
    baseline_ms: float,
    record_of: Callable[[Policy], dict[str, Any]],
    probe_of: Callable[[Policy], dict[str, Any]] | None = None,
) -> Fit | None:
    """The least pruned policy of ``policy``'s shape whose drift-corrected latency meets ``budget_ms``.

    ``record_of`` measures a policy's latency record (:meth:`search.measuring.candidate.CandidateMeter.record`);
    with ``probe_of`` (a quick timing) the bisection probes and only its answer is timed in full
    (:func:`search.pruning.recipes.budget_matched`). None when no strength meets the budget (the
    trial then runs the sample as it is) or when the sample prunes nothing (it has no shape to scale).
    """
    if policy.is_unpruned:
        return None
    grid = strength_grid(space, policy)
    measurements = Measured(record_of, baseline_ms, probe_of)
    measured: list[dict[str, float]] = []
    strength_of = {p.key(): s for s, p in grid}

    def note(candidate: Policy, ratio: float, how: str) -> float:
        measured.append({"strength": round(strength_of[candidate.key()], 4), "ratio": round(ratio, 4), "how": how})
        return ratio

    def rough(candidate: Policy) -> float:
        return note(candidate, measurements.rough(candidate), "probe" if probe_of is not None else "full")

    def full(candidate: Policy) -> float:
        return note(candidate, measurements.ratio(candidate), "full")

    found = budget_matched(grid, budget_ms / baseline_ms, rough, confirm=full if probe_of is not None else None)
    if found is None:
        return None
    strength, fitted, _ = found
    return Fit(policy=fitted, strength=strength, latency=measurements.record(fitted), measured=measured)
