"""Start-up policies near the budget: the budget-matched recipes redrawn, kept where their latency lands just under it.

Random start-up policies drawn from the whole space mostly miss a tight budget, and a trial over the
budget teaches the sampler little; these take the sampler's random start-up trials' place
(:func:`search.pruning.recipes.later_recipes`).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

from search.pruning.policy import Policy
from search.pruning.space import SearchSpace

__all__ = [
    "ESTIMATE_MARGIN",
    "NEAR_BUDGET_ATTEMPTS",
    "NEAR_BUDGET_DRAWS",
    "NEAR_BUDGET_FLOOR",
    "NEAR_BUDGET_SAMPLES",
    "NEAR_BUDGET_SPREAD",
    "estimate_scale",
    "near_budget",
]

NEAR_BUDGET_SAMPLES = 3
"""Start-up policies a new study draws around the budget-matched recipes (in place of TPE's random ones)."""

NEAR_BUDGET_ATTEMPTS = 8
"""At most this many candidates are measured to find them."""

NEAR_BUDGET_SPREAD = 0.2
"""How far (in prune ratio) a start-up sample's stage ratios stray from its recipe's."""

NEAR_BUDGET_FLOOR = 0.8
"""A start-up sample must use at least this fraction of the budget (a much faster one wastes accuracy)."""

NEAR_BUDGET_DRAWS = 64
"""With the tables' estimate to filter by, at most this many candidates are drawn (only the plausible measured)."""

ESTIMATE_MARGIN = 0.1
"""How far (relative) outside the band the tables' scaled estimate of a draw may be and still be measured."""


def near_budget(
    space: SearchSpace,
    anchors: list[Policy],
    fraction: float,
    ratio_of: Callable[[Policy], float],
    seed: int,
    estimate: Callable[[Policy], float | None] | None = None,
) -> list[Policy]:
    """Start-up policies that use most of the latency budget (``fraction`` of the baseline) without exceeding it.

    Random start-up policies drawn from the whole space mostly miss a tight budget (at 25% of the
    baseline, 11 of 12 in one study), and a trial over the budget teaches the sampler little.
    These are the ``anchors`` (the budget-matched recipes) with every stage's ratios redrawn within
    ``NEAR_BUDGET_SPREAD`` and criteria and rounding redrawn, kept when their measured latency
    lands between ``NEAR_BUDGET_FLOOR`` of the budget and the budget. At most ``NEAR_BUDGET_ATTEMPTS``
    are measured. With ``estimate`` (the latency-aware tables' rough latency fraction of a policy,
    :func:`search.pruning.latency_aware.estimated_fraction`), each draw's estimate, scaled by how far
    the anchors' estimates were from their measurements (:func:`estimate_scale`), must land within
    ``ESTIMATE_MARGIN`` of that band to be measured at all; up to ``NEAR_BUDGET_DRAWS`` are drawn.
    """
    rng = random.Random(seed)
    criteria = {s.name: [c for c in s.criteria if c != "random"] or list(s.criteria) for s in space.stages}
    scale = estimate_scale(anchors, ratio_of, estimate)  # the anchors were measured: no probe
    low, high = NEAR_BUDGET_FLOOR * fraction * (1 - ESTIMATE_MARGIN), fraction * (1 + ESTIMATE_MARGIN)
    found: list[Policy] = []
    tried: set[str] = set()
    measured = 0
    for attempt in range((NEAR_BUDGET_DRAWS if scale else NEAR_BUDGET_ATTEMPTS) if anchors else 0):
        if len(found) == NEAR_BUDGET_SAMPLES or measured == NEAR_BUDGET_ATTEMPTS:
            break
        anchor = anchors[attempt % len(anchors)]
        fractions = {
            name: (_nearby(rng, choice.stream), _nearby(rng, choice.inner)) for name, choice in anchor.stages.items()
        }
        chosen = {s.name: rng.choice(criteria[s.name]) for s in space.stages}
        policy = space.allocated(fractions, chosen, anchor.precision, rng.choice(space.round_to))
        if policy.is_unpruned or policy.key() in tried or any(policy.key() == a.key() for a in anchors):
            continue
        tried.add(policy.key())
        if scale and not low <= (estimate(policy) or 0.0) * scale[anchor.precision] <= high:  # type: ignore[misc]
            continue  # the tables put it far outside the band: not worth a measurement
        measured += 1
        if NEAR_BUDGET_FLOOR * fraction <= ratio_of(policy) <= fraction:
            found.append(policy)
    return found


def estimate_scale(
    anchors: list[Policy], ratio_of: Callable[[Policy], float], estimate: Callable[[Policy], float | None] | None
) -> dict[str, float]:
    """Per precision, the median over its anchors of measured latency over the tables' estimate (empty: nothing
    to filter with). The tables were timed in FP32, so an INT8 anchor calibrates INT8 draws only.

    The median, not each anchor's own: one anchor's estimate can be far off where the others' are not (in one
    study the latency-aware recipe was measured at 1.47x its estimate, the other two at 0.99 and 1.02).
    """
    guesses = [estimate(a) for a in anchors] if estimate is not None else []
    if not guesses or any(g is None or g <= 0 for g in guesses):
        return {}
    ratios: dict[str, list[float]] = {}
    for anchor, guess in zip(anchors, guesses, strict=True):
        ratios.setdefault(anchor.precision, []).append(ratio_of(anchor) / float(guess))  # type: ignore[arg-type]
    return {precision: statistics.median(found) for precision, found in ratios.items()}


def _nearby(rng: random.Random, ratio: float) -> float:
    return max(0.0, ratio + rng.uniform(-NEAR_BUDGET_SPREAD, NEAR_BUDGET_SPREAD))
