"""Measuring the tables of the latency-aware recipe: each stage pruned alone, timed and scored.

For every stage the space lets vary, a copy of the baseline has only that stage pruned (the space's
uniform criterion) at its full level and, where that can inform the allocation, at its middle one
(:func:`search.pruning.latency_aware.probe_stages`). Each is timed through the study's
:class:`~search.measuring.candidate.CandidateMeter` (interleaved with the unpruned model,
drift-corrected, as every candidate, with fewer rounds: :data:`PROBE_TIMING`) and, after
BatchNorm recalibration and no fine-tune, scored on at most :data:`PROBE_VAL_IMAGES` of the
validation images the trials use. These numbers only rank where channels cost least; no trial's
latency comes from them. The allocation itself is :mod:`search.pruning.latency_aware`; the study
stores the tables (``latency_aware`` user attribute).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from search.measuring.candidate import CandidateMeter
from search.measuring.hardware import OnThisMachine
from search.progress import Reporter
from search.pruning.channels import prune_copy
from search.pruning.latency_aware import Probe, SensitivityTable, probe_stages, stage_fractions, tunable_stages
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace
from search.training.evaluate import top1
from search.training.finetune import recalibrate_batchnorm

__all__ = ["PROBE_TIMING", "PROBE_VAL_IMAGES", "measure_sensitivity", "probe_meter", "probe_record_of"]

PROBE_VAL_IMAGES = 1000
"""A probe's top-1 is read on at most this many validation images (a fixed subset): it ranks stages, whose
drops at their full level differ by far more than the sampling error of 1,000 images (about 1 pp)."""

PROBE_TIMING = {"warmup": 3, "min_rounds": 2, "tolerance": 0.05, "min_seconds": 0.0, "max_seconds": 5.0}
"""How a probe is timed on this machine (the trials' timing: 10 warm-up runs, 3 rounds or more, 2%, at
least 1 s, up to 30 s). A probe only ranks stages; a busy machine spent up to 30 s on each at the trials'
settings, and the 1 s floor would add a second to each of a table's probes."""


def probe_meter(meter: CandidateMeter) -> CandidateMeter:
    """``meter`` timing with :data:`PROBE_TIMING` where it times on this machine (a latency target keeps its own)."""
    if not isinstance(meter.timer, OnThisMachine):
        return meter
    quick = copy.copy(meter)
    quick.timer = meter.timer.with_settings(dataclasses.replace(meter.timer.settings, **PROBE_TIMING))
    return quick


def probe_record_of(meter: CandidateMeter) -> Callable[[Policy], dict[str, Any]] | None:
    """A quick latency record of a policy (:func:`probe_meter`'s), or None where ``meter`` keeps its own timing
    (a latency target): what the budget searches probe with before they time their answer in full."""
    quick = probe_meter(meter)
    return None if quick is meter else quick.record


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
) -> SensitivityTable:
    """The per-stage latency and accuracy tables (``meter.baseline_ms`` must be set)."""
    if meter.baseline_ms is None:
        raise ValueError("the study's baseline latency is not known yet: call time_baseline first")
    started = time.perf_counter()
    data = meter.data
    stages = tunable_stages(space)
    criterion = space.uniform_criterion
    quick = probe_meter(meter)
    limit = min(val_images or len(data.val), PROBE_VAL_IMAGES, len(data.val))
    if limit != min(val_images or len(data.val), len(data.val)):  # the baseline on the probes' images too
        baseline_accuracy = top1(baseline, data, "val", limit=limit, device=device)
    with reporter.task("latency-aware tables: each stage pruned alone", 2 * len(stages)) as task:

        def probe(name: str, level: float) -> Probe:
            policy = space.allocated(stage_fractions(space, {name: level}), criterion, "fp32")
            model = prune_copy(baseline, policy, space, data).model
            latency_ms = quick.time_model(model, "fp32").record["corrected_ms"]
            recalibrate_batchnorm(model, data, batches=bn_batches, seed=0, device=device)
            accuracy = top1(model, data, "val", limit=limit, device=device)
            task.advance(1, stage=name, level=level)
            return Probe(level, latency_ms, accuracy)

        probes, skipped = probe_stages(
            stages, probe, baseline_ms=meter.baseline_ms, baseline_accuracy=baseline_accuracy, val_images=limit
        )
    return SensitivityTable(
        baseline_ms=meter.baseline_ms,
        baseline_accuracy=baseline_accuracy,
        stages=probes,
        criterion=criterion,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        val_images=limit,
    )
