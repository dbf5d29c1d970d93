"""The policies a new study tries first, so its front always shows what the usual recipes give.

* the unpruned model (and, where INT8 is searched, the unpruned model quantized: "just quantize");
* uniform pruning at the space's fixed ``uniform_ratios``;
* per precision, the uniform ratio that just meets the budget, and torch-pruning's global
  magnitude allocation that just meets it, each found by bisection on measured latency: the
  recipes an engineer would tune by hand, so a search can only be judged by what it finds beyond
  them (:func:`first_recipes`);
* once the study's first trial has run (:func:`later_recipes`, :mod:`search.study.later_setup`): the
  latency-aware allocation (:mod:`search.pruning.latency_aware`), its strength found the same way,
  then a few start-up samples near the budget (:func:`search.pruning.near_budget.near_budget`), in
  place of the sampler's random start-up policies, which mostly miss a tight budget. They need the
  latency-aware tables, the costliest part of setting a study up, so the first trial does not wait for them.

Where the study gives a quick probe timing (fewer rounds, no floor), the bisections and the
start-up samples search with it, and only a bisection's answer is timed in full (stepping on to the
next more pruned policy in the rare case the full timing misses the budget): the probes only choose
what to time. A recipe chosen by a full timing carries that latency record, and its trial reuses it;
a start-up sample chosen by a probe carries none, and its trial times it in full as any trial.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.progress import Reporter
from search.pruning.channels import global_magnitude_allocation
from search.pruning.near_budget import NEAR_BUDGET_FLOOR, near_budget
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace

__all__ = [
    "Measured",
    "Recipe",
    "bracket_search",
    "budget_matched",
    "distinct",
    "first_recipes",
    "fixed_recipes",
    "global_grid",
    "later_recipes",
    "uniform_grid",
]


@dataclass(frozen=True)
class Recipe:
    label: str | None
    """What the recipe is ("uniform 0.35 l1"); None for a start-up sample near the budget."""
    policy: Policy
    latency: dict[str, Any] | None = None
    """Its latency record (with ``arch_hash``) when the study measured it to choose it."""


def uniform_grid(space: SearchSpace, precision: str) -> list[tuple[float, Policy]]:
    """Uniform policies at every ratio of the space's grid (distinct ones only), least pruned first."""
    ratios = [k * space.ratio_step for k in range(1, round(1 / space.ratio_step))]
    return distinct(space, [(r, space.uniform(r, precision=precision)) for r in ratios])


def global_grid(
    space: SearchSpace, baseline: nn.Module, example_input: torch.Tensor, precision: str
) -> list[tuple[float, Policy]]:
    """Global magnitude allocations at every ratio of the grid, as the space's policies (distinct ones only).

    torch-pruning's global recipe lets the weights decide where channels go; expressed in the
    space's per-stage ratios (snapped to its grid, L2 criterion) it runs as any other trial.
    """
    ratios = [k * space.ratio_step for k in range(1, round(1 / space.ratio_step))]
    allocations = global_magnitude_allocation(copy.deepcopy(baseline), space, example_input, ratios)
    policies = [(r, space.allocated(a, "l2", precision)) for r, a in zip(ratios, allocations, strict=True)]
    return distinct(space, [(r, p) for r, p in policies if not p.is_unpruned])


def distinct(space: SearchSpace, grid: list[tuple[float, Policy]]) -> list[tuple[float, Policy]]:
    """``grid`` without policies equal to the one before them (snapping to the grid makes neighbours coincide)."""
    kept: list[tuple[float, Policy]] = []
    for ratio, policy in grid:
        if not kept or space.params_for(policy) != space.params_for(kept[-1][1]):
            kept.append((ratio, policy))
    return kept


def budget_matched(
    grid: list[tuple[float, Policy]],
    fraction: float,
    ratio_of: Callable[[Policy], float],
    estimates: list[float] | None = None,
    confirm: Callable[[Policy], float] | None = None,
) -> tuple[float, Policy, float] | None:
    """The least-pruned policy of ``grid`` (ordered by ratio) whose latency ratio is within ``fraction``.

    Latency falls with the ratio only roughly (rounding makes steps uneven), so the search finds a
    policy that meets the budget next to one that does not (or next to the unpruned model), in a
    handful of measurements. With ``estimates`` (each policy's rough latency over the baseline's,
    falling along the grid) it starts where they put the budget and interpolates between the
    measurements that bracket it (:func:`bracket_search`), usually in 2 or 3 measurements instead
    of bisection's 5 or 6; the estimates only choose what to measure, every answer is measured.
    With ``confirm`` (the full measurement, where ``ratio_of`` is a quick probe) the answer is
    measured again by it and, should that miss the budget, the next more pruned policies are, until
    one meets it. Returns the grid ratio, the policy and its latency ratio (``confirm``'s if given).
    """
    measured: dict[int, float] = {}

    def ratio(i: int) -> float:
        if i not in measured:
            measured[i] = ratio_of(grid[i][1])
        return measured[i]

    if not grid:
        return None
    if estimates is not None:
        found = bracket_search(estimates, fraction, ratio)
    elif ratio(len(grid) - 1) > fraction:
        found = None
    else:
        low, high = -1, len(grid) - 1  # grid[low] is over the budget (-1: the unpruned model), grid[high] meets it
        while high - low > 1:
            middle = (low + high) // 2
            if ratio(middle) <= fraction:
                high = middle
            else:
                low = middle
        found = high
    if found is None:
        return None
    if confirm is None:
        return grid[found][0], grid[found][1], measured[found]
    for i in range(found, len(grid)):
        full = confirm(grid[i][1])
        if full <= fraction:
            return grid[i][0], grid[i][1], full
    return None


def bracket_search(estimates: list[float], fraction: float, ratio: Callable[[int], float]) -> int | None:
    """The index of a grid point whose measured ``ratio`` meets ``fraction`` next to one that does not.

    ``estimates[i]`` is point ``i``'s rough latency over the baseline's (the unpruned model, index
    -1, is 1.0). Each step measures the point where the line through the two measurements that
    bracket the budget (estimate against measured ratio) crosses it; a step that does not halve the
    bracket is followed by a plain bisection step, so it never takes many more measurements than
    bisection. Before any point is known to meet the budget, the estimates are scaled by the last
    miss; two misses in a row measure the most pruned point (None when even that misses).
    """
    last = len(estimates) - 1
    low, high = -1, None  # low is over the budget (-1: the unpruned model), high meets it
    known = {-1: 1.0}
    misses = 0
    bisect_next = False

    def est(i: int) -> float:
        return 1.0 if i < 0 else max(estimates[i], 1e-9)

    while high is None or high - low > 1:
        if high is None:
            if misses >= 2:
                guess = last
            else:
                scale = known[low] / est(low)  # how far off the estimates were at the last miss
                guess = next((i for i in range(low + 1, last + 1) if est(i) * scale <= fraction), last)
        elif bisect_next:
            guess = (low + high) // 2
        else:
            e0, e1, m0, m1 = est(low), est(high), known[low], known[high]
            target = e1 if m0 == m1 else e0 + (fraction - m0) * (e1 - e0) / (m1 - m0)
            guess = next((i for i in range(low + 1, high) if est(i) <= target), high - 1)
        guess = min(max(guess, low + 1), last if high is None else high - 1)
        width = (last + 1 if high is None else high) - low
        known[guess] = ratio(guess)
        if known[guess] <= fraction:
            high = guess
        else:
            low = guess
            misses += high is None
            if high is None and guess == last:
                return None
        new_width = (last + 1 if high is None else high) - low
        bisect_next = not bisect_next and high is not None and 2 * new_width > width
    return high


def fixed_recipes(space: SearchSpace) -> list[Recipe]:
    """The unpruned model, uniform pruning at the space's fixed ratios, and (searching INT8) the unpruned INT8 model."""
    recipes = [Recipe("unpruned", space.unpruned())] + [
        Recipe(f"uniform {r:g} {space.uniform_criterion}", space.uniform(r)) for r in space.uniform_ratios
    ]
    if set(space.precisions) == {"fp32", "int8"}:  # what "just quantize" gives, beside the FP32 baseline
        recipes.append(Recipe("unpruned int8", space.unpruned("int8")))
    return recipes


def first_recipes(
    space: SearchSpace,
    budget_ms: float,
    measured: Measured,
    reporter: Reporter,
    global_grid_of: Callable[[str], list[tuple[float, Policy]]] | None = None,
    phase: Callable[[str], AbstractContextManager[object]] | None = None,
) -> list[Recipe]:
    """The recipes a new study runs first, in order: :func:`fixed_recipes`, then per precision the uniform ratio
    and (with ``global_grid_of``, :func:`global_grid`) the global magnitude allocation that just meet the budget.

    ``measured`` (:class:`Measured`) times each policy once: what was chosen by measurement carries the record
    that chose it, for its trial to reuse. ``phase(name)`` times each bisection (a context manager,
    :meth:`search.study.creation_clock.CreationClock.phase`). These need neither the latency-aware tables nor
    the start-up samples, which :func:`later_recipes` adds once the first trial has run.
    """
    recipes = fixed_recipes(space)
    grids = lambda precision: [  # noqa: E731
        ("uniform", space.uniform_criterion, uniform_grid(space, precision)),
        *([("global", "l2", global_grid_of(precision))] if global_grid_of is not None else []),
    ]
    return _matched(space, budget_ms, measured, reporter, recipes, grids, phase)


def later_recipes(
    space: SearchSpace,
    budget_ms: float,
    measured: Measured,
    reporter: Reporter,
    anchors: list[Policy],
    seed: int = 0,
    latency_aware_grid_of: Callable[[str], list[tuple[float, Policy]]] | None = None,
    phase: Callable[[str], AbstractContextManager[object]] | None = None,
    estimate_of: Callable[[Policy], float | None] | None = None,
) -> list[Recipe]:
    """What a study enqueues once its first trial has run: the latency-aware allocation that just meets the
    budget, then a few start-up samples near the budget (:func:`search.pruning.near_budget.near_budget`).

    ``anchors`` are the budget-matched recipes enqueued before (their records should be in ``measured``);
    ``latency_aware_grid_of(precision)`` gives the latency-aware allocation path
    (:func:`search.pruning.latency_aware.path_policies`, each policy with its estimated latency fraction), if
    wanted; ``estimate_of`` gives the latency-aware tables' rough latency fraction of a policy (None before
    they are measured), which spares the start-up samples' measurements of draws far from the budget.
    """
    timed = phase or (lambda name: nullcontext())
    if measured.baseline_ms <= budget_ms:
        return []
    grids = lambda precision: (  # noqa: E731
        [("latency-aware", space.uniform_criterion, distinct(space, latency_aware_grid_of(precision)))]
        if latency_aware_grid_of is not None
        else []
    )
    matched = _matched(space, budget_ms, measured, reporter, [], grids, phase)
    reporter.phase("sample start-up policies near the budget")
    anchors = anchors + [r.policy for r in matched]
    with timed("start-up samples near the budget"):
        nearby = near_budget(space, anchors, budget_ms / measured.baseline_ms, measured.rough, seed, estimate_of)
    how = "probed" if measured.probing else "measured"
    reporter.info(
        f"{len(nearby)} start-up policies {how} between {NEAR_BUDGET_FLOOR:.0%} and 100% of the budget; enqueued"
    )
    return matched + [Recipe(None, p, measured.full(p)) for p in nearby]


def _matched(
    space: SearchSpace,
    budget_ms: float,
    measured: Measured,
    reporter: Reporter,
    recipes: list[Recipe],
    grids_of: Callable[[str], list[tuple[str, str, list[tuple[float, Policy]]]]],
    phase: Callable[[str], AbstractContextManager[object]] | None,
) -> list[Recipe]:
    """``recipes`` and, per precision, each grid's policy that just meets the budget (by bisection on measured
    latency); the unpruned INT8 recipe, where quantizing alone meets the budget, carries its measurement."""
    timed = phase or (lambda name: nullcontext())
    fraction = budget_ms / measured.baseline_ms
    if fraction >= 1:
        return recipes
    reporter.phase("find the recipes that just meet the budget")
    matched: list[Recipe] = []
    for precision in space.precisions:
        suffix = " int8" if precision == "int8" else ""
        unpruned = space.unpruned(precision)
        if precision != "fp32":
            if measured.full(unpruned) is None:  # the set-up after the first trial reads creation's record
                with timed(f"unpruned{suffix} timed against the budget"):
                    measured.ratio(unpruned)
            # Its trial is judged by this measurement.
            record = measured.record(unpruned)
            ours = any(r.policy == unpruned for r in recipes)
            recipes = [Recipe(r.label, r.policy, record) if r.policy == unpruned else r for r in recipes]
            if measured.ratio(unpruned) <= fraction:  # quantizing alone meets the budget: "unpruned int8" is the recipe
                if ours:  # said once, by the pass that enqueues it
                    reporter.info(f"Unpruned{suffix} meets the budget ({measured.ratio(unpruned):.0%} of the baseline)")
                continue
        for kind, criterion, grid in grids_of(precision):
            # Where to start measuring: the tables' estimates, or (1 - r)^2, the MACs a ratio r leaves.
            estimates = [r if kind == "latency-aware" else (1 - r) ** 2 for r, _ in grid]
            with timed(f"{kind} recipe's bisection{suffix}"):
                found = budget_matched(grid, fraction, measured.rough, estimates, measured.ratio)
            if found is None:
                continue
            r, policy, ratio = found
            if kind == "latency-aware":  # its grid's numbers are estimated latency fractions, not ratios
                label = f"{kind} {criterion}{suffix} at the budget"
                said = f"Latency-aware{suffix} meets the budget ({ratio:.0%} of the baseline, estimated {r:.0%})"
            else:
                label = f"{kind} {r:g} {criterion}{suffix} at the budget"
                said = f"{kind.capitalize()} {r:g}{suffix} meets the budget ({ratio:.0%} of the baseline)"
            reporter.info(f"{said}; enqueued")
            recipe = Recipe(label, policy, measured.record(policy))
            if any(r.policy == policy for r in recipes):  # e.g. uniform 0.2 is also one of the fixed recipes
                recipes = [recipe if r.policy == policy else r for r in recipes]
            else:
                matched.append(recipe)
    return recipes + matched


class Measured:
    """Latency records by policy, each policy measured once (and probed at most once, where probes are given)."""

    def __init__(
        self,
        record_of: Callable[[Policy], dict[str, Any]],
        baseline_ms: float,
        probe_of: Callable[[Policy], dict[str, Any]] | None = None,
        known: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self._record_of = record_of
        self._probe_of = probe_of
        self.baseline_ms = baseline_ms
        self._records: dict[str, dict[str, Any]] = dict(known or {})
        """Full records by policy key (``known``: those measured before, e.g. the enqueued recipes')."""
        self._probes: dict[str, dict[str, Any]] = {}

    @property
    def probing(self) -> bool:
        """Whether searches use quick probes (only their answers are timed in full)."""
        return self._probe_of is not None

    def record(self, policy: Policy) -> dict[str, Any]:
        """``policy``'s full latency record (measured now if it was not before)."""
        if policy.key() not in self._records:
            self._records[policy.key()] = self._record_of(policy)
        return self._records[policy.key()]

    def full(self, policy: Policy) -> dict[str, Any] | None:
        """``policy``'s full latency record if one was measured, else None (it was only probed)."""
        return self._records.get(policy.key())

    def ratio(self, policy: Policy) -> float:
        """The drift-corrected latency over the study's baseline: exactly the trial's budget test."""
        return self.record(policy)["corrected_ms"] / self.baseline_ms

    def rough(self, policy: Policy) -> float:
        """The latency ratio a quick probe gives (the full one where measured already, or without probes)."""
        key = policy.key()
        if self._probe_of is None or key in self._records:
            return self.ratio(policy)
        if key not in self._probes:
            self._probes[key] = self._probe_of(policy)
        return self._probes[key]["corrected_ms"] / self.baseline_ms
