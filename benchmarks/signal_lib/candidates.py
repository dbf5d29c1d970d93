"""The candidates of one budget, all fitted to it: the study's recipes, the search's best trials, random shapes.

Where ``benchmarks/allocation.py`` left a study of this budget in its cache (``benchmarks/.allocation``),
its budget and baseline latency are used, its recipes at the budget and its best trials (by brief
accuracy) join, and so do its random allocations (fitted to the budget by measured bisection). Otherwise
the budget is measured here, the uniform and global recipes are found by bisection on measured latency as
a study does (the latency-aware recipe needs the study's sensitivity tables, so it joins only from a
study), and random shapes fill the rest: each stage's ratios drawn uniformly in the space, the
shape's strength fitted to the budget (:func:`search.pruning.budget_fit.fit_to_budget`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import optuna

from benchmarks.allocation import log
from benchmarks.signal_lib.bench import Bench
from search.pruning.budget_fit import fit_to_budget
from search.pruning.latency_aware import tunable_stages
from search.pruning.policy import Policy
from search.pruning.recipes import Measured, budget_matched, global_grid, uniform_grid
from search.study.front import Row, rows

__all__ = ["candidates", "study_path"]

RECIPES = ("uniform", "global", "latency-aware")


def study_path(allocation_work: Path, model: str, fraction: float, suffix: str = "") -> Path:
    return allocation_work / "studies" / f"{model}-{fraction:g}x{suffix}.db"


def _load(path: Path) -> optuna.Study | None:
    if not path.is_file():
        return None
    name = path.stem
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def candidates(bench: Bench, fraction: float, count: int, search_best: int, allocation_work: Path) -> dict[str, Any]:
    """The budget and ``count`` distinct candidates fitted to it (cached: the same set on every rerun)."""
    key = f"candidates {bench.model_name} {fraction:g} count {count}"
    return bench.cached(key, lambda: _build(bench, fraction, count, search_best, allocation_work))


def _build(bench: Bench, fraction: float, count: int, search_best: int, allocation_work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    study = _load(study_path(allocation_work, bench.model_name, fraction))
    found: list[dict[str, Any]] = []
    space, meter = bench.space, bench.meter
    if study is not None:
        baseline_ms = float(study.user_attrs["baseline_latency_ms"])
        budget_ms = float(study.user_attrs["budget_ms"])
        log(
            f"budget {fraction:g}: from allocation's study {study.study_name} ({budget_ms:.3f} ms of {baseline_ms:.3f})"
        )
        all_rows = [r for r in rows(study) if r.feasible and r.accuracy is not None and not r.policy.is_unpruned]
        for prefix in RECIPES:
            r = next(
                (r for r in all_rows if r.recipe and r.recipe.startswith(prefix) and "at the budget" in r.recipe), None
            )
            if r is not None:
                found.append(_of_row(r, "recipe", f"{r.recipe} (study trial {r.number})"))
        searched = sorted((r for r in all_rows if not r.recipe), key=lambda r: -(r.accuracy or 0.0))
        for r in searched[:search_best]:
            found.append(_of_row(r, "search", f"search trial {r.number} (brief val {100 * (r.accuracy or 0):.1f}%)"))
        randoms = _load(study_path(allocation_work, bench.model_name, fraction, "-random"))
        if randoms is not None:
            for r in rows(randoms):
                if r.feasible and r.accuracy is not None and r.recipe:
                    found.append(_of_row(r, "random", f"{r.recipe} (allocation benchmark)"))
    else:
        baseline_ms = meter.time_baseline().median_ms
        budget_ms = fraction * baseline_ms
        meter.baseline_ms = baseline_ms
        log(
            f"budget {fraction:g}: no study in {allocation_work}; measured here ({budget_ms:.3f} ms of {baseline_ms:.3f})"
        )
        measured = Measured(meter.record, baseline_ms)
        grids = [("uniform", "l1", uniform_grid(space, "fp32"))]
        grids.append(("global", "l2", global_grid(space, bench.baseline, bench.data.example_input(), "fp32")))
        for kind, criterion, grid in grids:
            got = budget_matched(grid, fraction, measured.ratio)
            if got is not None:
                ratio, policy, at = got
                found.append(_entry(policy, "recipe", f"{kind} {ratio:g} {criterion} at the budget", at))
    meter.baseline_ms = baseline_ms
    found = _distinct(found)[:count]
    rng = random.Random(f"{bench.model_name} {fraction:g} random")
    attempt = 0
    while len(found) < count and attempt < 6 * count:
        attempt += 1
        fractions = {
            s.name: (rng.uniform(s.stream.low, s.stream.high), rng.uniform(s.inner.low, s.inner.high))
            for s in space.stages
            if s.name in tunable_stages(space)
        }
        fit = fit_to_budget(space.allocated(fractions, "l1"), space, budget_ms, baseline_ms, meter.record)
        if fit is None:
            log(f"random shape {attempt}: no strength meets the budget; drawn again")
            continue
        label = f"random shape {attempt} (strength {fit.strength:.2f})"
        found = _distinct([*found, _entry(fit.policy, "random", label, fit.latency["ratio"])])
        log(f"{label}: {fit.policy.describe()} at {fit.latency['ratio']:.3f} of the baseline")
    for number, c in enumerate(found):
        c["id"] = f"c{number:02d}"
    return {
        "budget_ms": budget_ms,
        "baseline_ms": baseline_ms,
        "from_study": None if study is None else study.study_name,
        "candidates": found,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _of_row(r: Row, source: str, label: str) -> dict[str, Any]:
    return _entry(r.policy, source, label, r.ratio, brief_val=r.accuracy)


def _entry(policy: Policy, source: str, label: str, ratio: float | None, **extra: Any) -> dict[str, Any]:
    return {"source": source, "label": label, "policy": policy.to_dict(), "ratio": ratio, **extra}


def _distinct(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each policy once (seeds aside), the first label kept."""
    seen: set[str] = set()
    kept = []
    for c in found:
        policy = Policy.from_dict({**c["policy"], "seed": 0})
        if policy.key() not in seen:
            seen.add(policy.key())
            kept.append(c)
    return kept
