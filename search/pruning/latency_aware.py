"""The latency-aware allocation recipe: where to remove channels, from what each stage costs and gives.

A study measures, per stage, what pruning that stage alone does (:mod:`search.study.sensitivity`):
its drift-corrected latency (timed interleaved with the unpruned model, as every candidate) and
its top-1 after BatchNorm recalibration without fine-tuning. Those two tables say how many
milliseconds each stage can give and how much accuracy that costs. This module, given the tables
(no torch, no measuring), allocates: starting from the unpruned model it repeatedly takes the
step, in any one stage, that loses the least estimated accuracy per millisecond saved, adding up
the stages' savings and losses as if they were independent. The steps form a path from the
unpruned model to the most pruned one; the first point whose estimated latency meets the budget
is the allocation, and the study then measures points of the path for real and picks, by
bisection, the least pruned one that meets the budget (:func:`search.pruning.recipes.later_recipes`).

A stage's "level" is a fraction of its ratio ranges in the space: level 0.5 of a stage with
``stream = [0, 0.6]`` and ``inner = [0, 0.8]`` removes 30% of its stream and 40% of its inner channels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from search.pruning.policy import Policy
from search.pruning.space import SearchSpace

__all__ = [
    "FLAT_SAVING",
    "FULL_LEVEL",
    "MID_LEVEL",
    "PROBE_LEVELS",
    "Allocation",
    "Probe",
    "SensitivityTable",
    "allocation_path",
    "estimated_fraction",
    "path_policies",
    "probe_stages",
    "stage_fractions",
    "tunable_stages",
]

FULL_LEVEL = 1.0
MID_LEVEL = 0.5
PROBE_LEVELS = (MID_LEVEL, FULL_LEVEL)
"""Levels (fractions of each stage's ranges) at which a stage is pruned alone and measured: every stage at its
full level, and at the middle one where that can change the allocation (:func:`probe_stages`). Studies made
before measured every stage at 1/3, 2/3 and 1 (their stored tables are read as they are)."""

FLAT_SAVING = 0.02
"""A stage whose full pruning saves less than this fraction of the baseline's latency is not probed in between."""

LEVEL_STEP = 1 / 6
"""The allocation moves stages on this grid of levels, interpolating the tables between probes."""


@dataclass(frozen=True)
class Probe:
    """One stage pruned alone at ``level``: what was measured."""

    level: float
    latency_ms: float
    """Drift-corrected latency (the budget's measure) of the model with only this stage pruned."""
    accuracy: float
    """Top-1 on the validation subset after BatchNorm recalibration, no fine-tune: the baseline's top-1 on that
    subset less the drop read on its first :attr:`images` images, paired with the baseline's reads of them."""
    images: int | None = None
    """Images the probe was read on (None: the whole subset, as tables made before stopping early)."""


@dataclass(frozen=True)
class SensitivityTable:
    """Per stage, latency and accuracy of that stage pruned alone at each of :data:`PROBE_LEVELS`."""

    baseline_ms: float
    baseline_accuracy: float
    stages: dict[str, tuple[Probe, ...]]
    criterion: str = "l1"
    """How channels were ranked in the probes (the recipe uses the same)."""
    seconds: float = 0.0
    """What measuring the table cost."""
    skipped: tuple[str, ...] = ()
    """Stages probed at their full level only, and why (``"layer1: saves 1% at most"``)."""
    val_images: int | None = None
    """Validation images each probe's top-1 was read on (None: not recorded, older tables)."""
    scoring: dict[str, Any] | None = None
    """How the probes were scored: ``engine`` (``onnxruntime`` or ``pytorch``) and, where both were timed to
    choose, what a read of ``images`` validation images took each, ``ms_per_read`` (None: older tables, PyTorch)."""

    def saved_ms(self, stage: str, level: float) -> float:
        """Estimated milliseconds saved by pruning ``stage`` alone at ``level`` (interpolated between probes)."""
        return _interpolate(
            [(0.0, 0.0)] + [(p.level, self.baseline_ms - p.latency_ms) for p in self.stages[stage]], level
        )

    def accuracy_drop(self, stage: str, level: float) -> float:
        """Estimated top-1 lost by ``stage`` alone at ``level`` (never negative, never less at a higher level)."""
        drops, worst = [(0.0, 0.0)], 0.0
        for probe in self.stages[stage]:
            worst = max(worst, self.baseline_accuracy - probe.accuracy)
            drops.append((probe.level, worst))
        return _interpolate(drops, level)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, stored on the study (optuna-dashboard shows them)."""
        return {
            "baseline_ms": self.baseline_ms,
            "baseline_accuracy": self.baseline_accuracy,
            "criterion": self.criterion,
            "seconds": round(self.seconds, 1),
            "skipped": list(self.skipped),
            "val_images": self.val_images,
            **({} if self.scoring is None else {"scoring": self.scoring}),
            "stages": {
                name: [
                    {"level": p.level, "latency_ms": p.latency_ms, "accuracy": p.accuracy}
                    | ({} if p.images is None else {"images": p.images})
                    for p in probes
                ]
                for name, probes in self.stages.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        return cls(
            baseline_ms=float(data["baseline_ms"]),
            baseline_accuracy=float(data["baseline_accuracy"]),
            stages={name: tuple(_probe(p) for p in probes) for name, probes in data["stages"].items()},
            criterion=str(data.get("criterion", "l1")),
            seconds=float(data.get("seconds", 0.0)),
            skipped=tuple(data.get("skipped", ())),
            val_images=data.get("val_images"),
            scoring=data.get("scoring"),
        )


def probe_stages(
    stages: list[str],
    probe: Callable[[str, float], Probe],
    *,
    baseline_ms: float,
    baseline_accuracy: float,
    val_images: int,
) -> tuple[dict[str, tuple[Probe, ...]], tuple[str, ...]]:
    """Each stage pruned alone at its full level, then at the middle level only where that can inform the allocation.

    ``probe(stage, level)`` measures one entry. The middle level is skipped for a stage whose full
    pruning saves under :data:`FLAT_SAVING` of the baseline's latency (the allocation takes it last,
    whatever its accuracy), or loses no more top-1 than the sampling error of ``val_images`` images
    (``sqrt(p(1 - p) / n)``: the accuracy is flat, and the straight line from the unpruned model to the
    full level is what a middle probe would say within noise). Returns the probes by stage and the
    stages probed at the full level only, with why.
    """
    noise = math.sqrt(max(baseline_accuracy * (1 - baseline_accuracy), 1e-4) / max(val_images, 1))
    full = {name: probe(name, FULL_LEVEL) for name in stages}
    probes: dict[str, tuple[Probe, ...]] = {}
    skipped: list[str] = []
    for name in stages:
        saved = (baseline_ms - full[name].latency_ms) / baseline_ms
        drop = baseline_accuracy - full[name].accuracy
        if saved < FLAT_SAVING:
            skipped.append(f"{name}: saves {saved:.0%} at most")
        elif drop <= noise:
            skipped.append(f"{name}: loses {max(drop, 0.0):.1%} at most (noise {noise:.1%})")
        else:
            probes[name] = (probe(name, MID_LEVEL), full[name])
            continue
        probes[name] = (full[name],)
    return probes, tuple(skipped)


def _probe(stored: dict[str, Any]) -> Probe:
    """A stored probe; fields a later version added are left out, so that this version reads its tables too."""
    known = {f.name for f in fields(Probe)}
    return Probe(**{k: v for k, v in stored.items() if k in known})


@dataclass(frozen=True)
class Allocation:
    """A point of the allocation path: each stage's level and what the tables estimate for it."""

    levels: dict[str, float]
    estimated_ms: float
    estimated_drop: float


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def tunable_stages(space: SearchSpace) -> list[str]:
    """The stages whose ratios the space lets vary (the others have nothing to allocate)."""
    return [s.name for s in space.stages if not (s.stream.fixed and s.inner.fixed)]


def stage_fractions(space: SearchSpace, levels: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(stream, inner) ratios of each stage at its level of its ranges (unlisted stages at their lows)."""
    fractions = {}
    for stage in space.stages:
        level = levels.get(stage.name, 0.0)
        stream, inner = stage.stream, stage.inner
        fractions[stage.name] = (
            stream.low + level * (stream.high - stream.low),
            inner.low + level * (inner.high - inner.low),
        )
    return fractions


def allocation_path(table: SensitivityTable, step: float = LEVEL_STEP) -> list[Allocation]:
    """From the unpruned model to the most pruned one, each step the cheapest in accuracy per millisecond.

    A step moves one stage up to any higher level of the grid (not only the next: the latency of
    a stage falls unevenly with its channel rounding) and must save time by the tables; among the
    steps, the least estimated top-1 lost per millisecond saved wins, and the smaller step on a tie (so the
    path passes every point of a straight stretch of the tables, for the bisection to choose from).
    Every point of the path is at least as pruned as the one before, and estimated faster.
    """
    grids = {}
    for name, probes in table.stages.items():
        top = max((p.level for p in probes), default=0.0)
        grid = [min(top, k * step) for k in range(round(top / step) + 1)]
        grids[name] = [(level, table.saved_ms(name, level), table.accuracy_drop(name, level)) for level in grid]
    current = {name: 0 for name in grids}
    path = [Allocation({name: 0.0 for name in grids}, table.baseline_ms, 0.0)]
    while True:
        best: tuple[tuple[float, float], str, int] | None = None
        for name, grid in grids.items():
            _, saved_now, drop_now = grid[current[name]]
            for index in range(current[name] + 1, len(grid)):
                _, saved, drop = grid[index]
                gain = saved - saved_now
                if gain <= 1e-9:
                    continue
                key = (round(max(0.0, drop - drop_now) / gain, 9), gain)
                if best is None or key < best[0]:
                    best = (key, name, index)
        if best is None:
            return path
        _, name, index = best
        current[name] = index
        levels = {n: grids[n][i][0] for n, i in current.items()}
        saved = sum(grids[n][i][1] for n, i in current.items())
        drop = sum(grids[n][i][2] for n, i in current.items())
        path.append(Allocation(levels, table.baseline_ms - saved, drop))


def path_policies(
    space: SearchSpace, table: SensitivityTable, precision: str, step: float = LEVEL_STEP
) -> list[tuple[float, Policy]]:
    """The pruned points of the path as the space's policies, least pruned first, each with its estimated
    latency as a fraction of the baseline (the grid the study bisects on measured latency)."""
    grid = []
    for point in allocation_path(table, step)[1:]:
        policy = space.allocated(stage_fractions(space, point.levels), table.criterion, precision)
        grid.append((point.estimated_ms / table.baseline_ms, policy))
    return grid


def estimated_fraction(table: SensitivityTable, space: SearchSpace, policy: Policy) -> float:
    """The tables' latency estimate for any policy of the space, as a fraction of the baseline's.

    Each stage's level is read back from its ratios (the mean of its stream's and inner's places in their
    ranges) and the stages' savings are added as if independent, as the allocation path does: rough (rounding,
    criteria and precision are ignored), so it only chooses what to measure.
    """
    saved = 0.0
    for stage in space.stages:
        choice = policy.stages.get(stage.name)
        if choice is None or not table.stages.get(stage.name):
            continue
        places = [
            (value - ratios.low) / (ratios.high - ratios.low)
            for value, ratios in ((choice.stream, stage.stream), (choice.inner, stage.inner))
            if not ratios.fixed
        ]
        if places:
            saved += table.saved_ms(stage.name, max(0.0, sum(places) / len(places)))
    return max(table.baseline_ms - saved, 0.0) / table.baseline_ms
