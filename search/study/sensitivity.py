"""Measuring the tables of the latency-aware recipe: each stage pruned alone, timed and scored.

For every stage the space lets vary and every level of :data:`search.pruning.latency_aware.PROBE_LEVELS`,
a copy of the baseline has only that stage pruned (the space's uniform criterion), is timed
through the study's :class:`~search.measuring.candidate.CandidateMeter` (interleaved with the
unpruned model, drift-corrected, as every candidate) and, after BatchNorm recalibration and no
fine-tune, scored on the validation subset the trials use. The allocation itself is
:mod:`search.pruning.latency_aware`; the study stores the tables (``latency_aware`` user attribute).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from search.measuring.candidate import CandidateMeter
from search.progress import Reporter
from search.pruning.channels import prune_copy
from search.pruning.latency_aware import PROBE_LEVELS, Probe, SensitivityTable, stage_fractions, tunable_stages
from search.pruning.space import SearchSpace
from search.training.evaluate import top1
from search.training.finetune import recalibrate_batchnorm

__all__ = ["measure_sensitivity"]


def measure_sensitivity(
    space: SearchSpace,
    baseline: nn.Module,
    meter: CandidateMeter,
    *,
    baseline_accuracy: float,
    bn_batches: int,
    val_images: int | None,
    device: str | torch.device,
    reporter: Reporter,
    levels: tuple[float, ...] = PROBE_LEVELS,
) -> SensitivityTable:
    """The per-stage latency and accuracy tables (``meter.baseline_ms`` must be set)."""
    if meter.baseline_ms is None:
        raise ValueError("the study's baseline latency is not known yet: call time_baseline first")
    started = time.perf_counter()
    data = meter.data
    stages = tunable_stages(space)
    criterion = space.uniform_criterion
    probes: dict[str, list[Probe]] = {name: [] for name in stages}
    with reporter.task("latency-aware tables: each stage pruned alone", len(stages) * len(levels)) as task:
        for name in stages:
            for level in levels:
                policy = space.allocated(stage_fractions(space, {name: level}), criterion, "fp32")
                model = prune_copy(baseline, policy, space, data).model
                latency_ms = meter.time_model(model, "fp32").record["corrected_ms"]
                recalibrate_batchnorm(model, data, batches=bn_batches, seed=0, device=device)
                accuracy = top1(model, data, "val", limit=val_images, device=device)
                probes[name].append(Probe(level, latency_ms, accuracy))
                task.advance(1, stage=name, level=level)
    return SensitivityTable(
        baseline_ms=meter.baseline_ms,
        baseline_accuracy=baseline_accuracy,
        stages={name: tuple(found) for name, found in probes.items()},
        criterion=criterion,
        seconds=time.perf_counter() - started,
    )
