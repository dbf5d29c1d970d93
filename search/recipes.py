"""The policies a new study tries first, so its front always shows what the usual recipes give.

* the unpruned model (and, where INT8 is searched, the unpruned model quantized: "just quantize");
* uniform pruning at the space's fixed ``uniform_ratios``;
* per precision, the uniform ratio that just meets the budget, found by bisection on measured
  latency: the recipe an engineer would tune by hand, so a search can only be judged by what it
  finds beyond it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from search.channel_pruning import apply_policy
from search.data import Dataset
from search.latency import LatencySettings, export_onnx, measure
from search.policy import Policy
from search.progress import Reporter
from search.quantize import QuantizeSettings, int8_latency_model
from search.space import SearchSpace

__all__ = ["Recipe", "budget_matched_uniform", "latency_record", "latency_records", "study_recipes"]


@dataclass(frozen=True)
class Recipe:
    label: str
    policy: Policy
    latency: dict[str, Any] | None = None
    """Its latency record (with ``arch_hash``) when the study measured it to choose it."""


def latency_record(
    policy: Policy,
    space: SearchSpace,
    baseline: nn.Module,
    data: Dataset,
    baseline_onnx: bytes,
    baseline_ms: float,
    latency: LatencySettings,
    quantize: QuantizeSettings,
) -> dict[str, Any]:
    """The pruned (and, for ``int8``, quantized) model timed interleaved with the baseline, as a trial records it."""
    return latency_records(
        policy, (policy.precision,), space, baseline, data, baseline_onnx, baseline_ms, latency, quantize
    )[policy.precision]


def latency_records(
    policy: Policy,
    precisions: tuple[str, ...] | list[str],
    space: SearchSpace,
    baseline: nn.Module,
    data: Dataset,
    baseline_onnx: bytes,
    baseline_ms: float,
    latency: LatencySettings,
    quantize: QuantizeSettings,
) -> dict[str, dict[str, Any]]:
    """``policy``'s pruned model timed in each of ``precisions`` (pruned once): latency records with ``arch_hash``."""
    model = copy.deepcopy(baseline)
    taylor = data.batches("train", 32, shuffle=True, augment=False, limit=64)
    pruned = apply_policy(model, policy, space, data.example_input(), taylor_batches=taylor)
    records = {}
    for precision in precisions:
        if precision == "int8":
            candidate = int8_latency_model(model, data, quantize)
        else:
            candidate = export_onnx(model, data.example_input())
        measured = measure(candidate, tuple(data.example_input().shape), latency, reference=baseline_onnx)
        records[precision] = {**measured.record(baseline_ms, latency.threads, precision), "arch_hash": pruned.arch_hash}
    return records


def budget_matched_uniform(
    space: SearchSpace, precision: str, fraction: float, ratio_of: Callable[[Policy], float]
) -> tuple[Policy, float] | None:
    """The least-pruned uniform policy on the space's grid whose latency ratio is within ``fraction``.

    Latency falls with the ratio only roughly (rounding makes steps uneven), so bisection finds a
    ratio that meets the budget next to one that does not, in a handful of measurements.
    """
    grid: list[Policy] = []
    step = space.ratio_step
    for k in range(1, round(1 / step)):
        policy = space.uniform(k * step, precision=precision)
        if not grid or space.params_for(policy) != space.params_for(grid[-1]):
            grid.append(policy)
    measured: dict[int, float] = {}

    def meets(i: int) -> bool:
        if i not in measured:
            measured[i] = ratio_of(grid[i])
        return measured[i] <= fraction

    if not grid or not meets(len(grid) - 1):
        return None
    low, high = -1, len(grid) - 1  # grid[low] is over the budget (-1: the unpruned model), grid[high] meets it
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return grid[high], measured[high]


def study_recipes(
    space: SearchSpace,
    budget_ms: float,
    baseline_ms: float,
    record_of: Callable[[Policy], dict[str, Any]],
    reporter: Reporter,
) -> list[Recipe]:
    """Labelled recipe policies for a new study, in the order they should run.

    ``record_of`` measures a policy's latency record (see :func:`latency_record`); the
    budget-matched recipes carry the record that chose them, for their trial to reuse.
    """
    recipes = [Recipe("unpruned", space.unpruned())] + [
        Recipe(f"uniform {r:g} {space.uniform_criterion}", space.uniform(r)) for r in space.uniform_ratios
    ]
    if set(space.precisions) == {"fp32", "int8"}:  # what "just quantize" gives, beside the FP32 baseline
        recipes.append(Recipe("unpruned int8", space.unpruned("int8")))
    if baseline_ms <= budget_ms:
        return recipes
    reporter.phase("find the uniform ratio that meets the budget")
    records: dict[str, dict[str, Any]] = {}

    def ratio_of(policy: Policy) -> float:
        # The drift-corrected latency over the study's baseline: exactly the trial's budget test.
        records[policy.key()] = record_of(policy)
        return records[policy.key()]["corrected_ms"] / baseline_ms

    for precision in space.precisions:
        found = budget_matched_uniform(space, precision, budget_ms / baseline_ms, ratio_of)
        if found is None:
            continue
        policy, ratio = found
        r = next(iter(policy.stages.values())).stream
        suffix = " int8" if precision == "int8" else ""
        reporter.info(f"Uniform {r:g}{suffix} meets the budget ({ratio:.0%} of the baseline); enqueued as a recipe")
        label = f"uniform {r:g} {space.uniform_criterion}{suffix} at the budget"
        recipes.append(Recipe(label, policy, records[policy.key()]))
    return recipes
