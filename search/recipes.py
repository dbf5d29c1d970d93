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

from torch import nn

from search.channel_pruning import apply_policy
from search.data import Dataset
from search.latency import LatencySettings, export_onnx, measure
from search.policy import Policy
from search.progress import Reporter
from search.quantize import QuantizeSettings, int8_latency_model
from search.space import SearchSpace

__all__ = ["budget_matched_uniform", "latency_ratio", "latency_ratios", "study_recipes"]


def latency_ratio(
    policy: Policy,
    space: SearchSpace,
    baseline: nn.Module,
    data: Dataset,
    baseline_onnx: bytes,
    latency: LatencySettings,
    quantize: QuantizeSettings,
) -> float:
    """The pruned (and, for ``int8``, quantized) model's median latency over the interleaved baseline's."""
    return latency_ratios(policy, (policy.precision,), space, baseline, data, baseline_onnx, latency, quantize)[
        policy.precision
    ]


def latency_ratios(
    policy: Policy,
    precisions: tuple[str, ...] | list[str],
    space: SearchSpace,
    baseline: nn.Module,
    data: Dataset,
    baseline_onnx: bytes,
    latency: LatencySettings,
    quantize: QuantizeSettings,
) -> dict[str, float]:
    """``policy``'s pruned model timed in each of ``precisions`` (pruned once), as ratios to the baseline."""
    model = copy.deepcopy(baseline)
    taylor = data.batches("train", 32, shuffle=True, augment=False, limit=64)
    apply_policy(model, policy, space, data.example_input(), taylor_batches=taylor)
    ratios = {}
    for precision in precisions:
        if precision == "int8":
            candidate = int8_latency_model(model, data, quantize)
        else:
            candidate = export_onnx(model, data.example_input())
        measured = measure(candidate, tuple(data.example_input().shape), latency, reference=baseline_onnx)
        assert measured.ratio is not None
        ratios[precision] = measured.ratio
    return ratios


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
    ratio_of: Callable[[Policy], float],
    reporter: Reporter,
) -> list[tuple[str, Policy]]:
    """Labelled recipe policies for a new study, in the order they should run."""
    recipes = [("unpruned", space.unpruned())] + [
        (f"uniform {r:g} {space.uniform_criterion}", space.uniform(r)) for r in space.uniform_ratios
    ]
    if set(space.precisions) == {"fp32", "int8"}:  # what "just quantize" gives, beside the FP32 baseline
        recipes.append(("unpruned int8", space.unpruned("int8")))
    if baseline_ms <= budget_ms:
        return recipes
    reporter.phase("find the uniform ratio that meets the budget")
    for precision in space.precisions:
        found = budget_matched_uniform(space, precision, budget_ms / baseline_ms, ratio_of)
        if found is None:
            continue
        policy, ratio = found
        r = next(iter(policy.stages.values())).stream
        suffix = " int8" if precision == "int8" else ""
        reporter.info(f"Uniform {r:g}{suffix} meets the budget ({ratio:.0%} of the baseline); enqueued as a recipe")
        recipes.append((f"uniform {r:g} {space.uniform_criterion}{suffix} at the budget", policy))
    return recipes
