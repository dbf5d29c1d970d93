"""One trial: policy -> pruned model -> measured latency -> (if within budget) brief fine-tune.

The order matters: latency is measured first, with nothing else running, and a policy over
the budget is recorded as infeasible without spending any training on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from torch import nn

from search.data.dataset import Dataset
from search.measuring.candidate import CandidateMeter, Known
from search.measuring.complexity import macs_and_params
from search.measuring.quantize import QuantizeSettings, quantize_model
from search.progress import NullReporter, Reporter
from search.pruning.budget_fit import fit_to_budget
from search.pruning.channels import prune_copy
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace
from search.study.origin import ENQUEUED_ATTRS, LATENCY_AT_CREATION, is_enqueued
from search.study.rungs import PromotionSettings
from search.study.sensitivity import probe_record_of
from search.study.trial_weights import save_weights, weights_path
from search.study.uncertainty import accuracy_record, wilson
from search.training.evaluate import onnx_top1_correct, reads_whole_split, top1, top1_correct
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train

__all__ = [
    "BASELINE_RECORD",
    "INFEASIBLE_ACCURACY",
    "LATENCY_AT_CREATION",
    "LATENCY_CONSTRAINT",
    "TrialContext",
    "TrialOutcome",
    "run_trial",
]

LATENCY_CONSTRAINT = "latency_over_budget_ms"
"""The Optuna constraint each trial sets: drift-corrected latency minus the budget."""

BASELINE_RECORD = "baseline_accuracy_record"
READ_ENGINE = "read_engine"
"""Study attribute: the engine that read the validation split at creation, the baseline and the latency-aware
tables' probes, and ``probes`` where these read in another (PyTorch under bf16 autocast; the baseline stays FP32)
(:func:`search.study.sensitivity.read_engine`; studies made before it read in PyTorch). Trials read in PyTorch:
on pruned models at tight budgets it was as fast as ONNX Runtime or faster."""
"""Study user attribute: the baseline's per-image record on the trials' validation images (read at creation)."""

INFEASIBLE_ACCURACY = 0.0
"""Objective value stored for policies over the budget: they are never fine-tuned or evaluated."""


@dataclass
class TrialContext:
    """Everything a trial needs, prepared once per search."""

    meter: CandidateMeter
    """Times every candidate (and holds the baseline, its ONNX and the study's reference latency)."""
    baseline_accuracy: float
    data: Dataset
    space: SearchSpace
    budget_ms: float
    finetune: TrainSettings
    bn_batches: int
    hardware: dict[str, Any]
    reporter: Reporter = field(default_factory=NullReporter)
    val_images: int | None = None
    """Evaluate on a fixed random subset of this many validation images (None: all of them)."""
    train_device: dict[str, Any] = field(default_factory=dict)
    """Where this worker fine-tunes and evaluates (:func:`search.training.device.device_record`)."""
    fit_budget: bool = False
    """Fit each sampled policy's strength to the budget (:mod:`search.pruning.budget_fit`); enqueued ones run as
    they are."""
    promotion: PromotionSettings | None = None
    """With promotion on, each fine-tuned trial's weights are kept for promotions (:mod:`search.study.promotion`)."""
    baseline_record: dict[str, Any] | None = None
    """The baseline's accuracy record on the trials' validation images (None in studies made before it was kept)."""

    @property
    def baseline(self) -> nn.Module:
        return self.meter.baseline

    @property
    def quantize(self) -> QuantizeSettings:
        """How ``int8`` policies are quantized (calibration method and images)."""
        return self.meter.quantize


@dataclass
class TrialOutcome:
    accuracy: float
    latency_ms: float
    feasible: bool


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> TrialOutcome:
    """Run one trial and record everything about it as user attributes on ``trial``."""
    reporter = ctx.reporter
    seconds: dict[str, float] = {}
    policy = ctx.space.suggest(trial)
    policy = dataclasses.replace(policy, seed=trial.number)
    fitted_latency = None
    if ctx.fit_budget and not is_enqueued(trial.user_attrs):
        reporter.phase("fit to the budget")
        started = time.perf_counter()
        probe_of = probe_record_of(ctx.meter)
        fit = fit_to_budget(policy, ctx.space, ctx.budget_ms, _baseline_ms(ctx), ctx.meter.record, probe_of)
        if fit is not None:
            trial.set_user_attr("budget_fit", fit.summary(policy))
            policy, fitted_latency = fit.policy, fit.latency
        seconds["budget_fit"] = time.perf_counter() - started
    trial.set_user_attr("policy", policy.to_dict())
    trial.set_user_attr("precision", policy.precision)
    if policy.precision == "int8":
        trial.set_user_attr("quantization", {**ctx.quantize.to_dict(), "format": "QDQ", "per_channel": True})
    trial.set_user_attr("policy_key", _without_seed(policy))
    trial.set_user_attr("hardware", ctx.hardware)
    if ctx.train_device:
        trial.set_user_attr("train_device", ctx.train_device)

    earlier = _same_policy(trial, policy)
    if earlier is not None:
        return _copy_outcome(trial, earlier, reporter)

    reporter.phase("prune channels")
    started = time.perf_counter()
    pruned = prune_copy(ctx.baseline, policy, ctx.space, ctx.data, seed=trial.number)
    macs, params = macs_and_params(pruned.model, ctx.data.input_size)
    seconds["prune"] = time.perf_counter() - started
    trial.set_user_attr("channels", pruned.channels)
    trial.set_user_attr("removed", pruned.removed)
    trial.set_user_attr("arch_hash", pruned.arch_hash)
    # Which channels went, so export rebuilds exactly this model (whatever the criterion).
    trial.set_user_attr("pruning_history", pruned.history)
    trial.set_user_attr("macs", macs)
    trial.set_user_attr("params", params)

    reporter.phase("latency")
    started = time.perf_counter()
    latency = _latency(trial, ctx, pruned.model, pruned.arch_hash, policy.precision, seconds, fitted_latency)
    seconds["latency"] = time.perf_counter() - started - seconds.get("quantize", 0.0)
    latency_ms = latency["corrected_ms"]
    feasible = latency_ms <= ctx.budget_ms
    trial.set_user_attr("budget_violation_ms", latency_ms - ctx.budget_ms)
    trial.set_constraint(LATENCY_CONSTRAINT, latency_ms - ctx.budget_ms)  # <= 0 is feasible
    trial.set_user_attr("feasible", feasible)

    if policy.is_unpruned:
        # The baseline's own top-1; quantized, it is measured in ONNX Runtime (never fine-tuned).
        if policy.precision == "fp32":
            accuracy = ctx.baseline_accuracy
            _baseline_record(trial, ctx)
        else:
            accuracy = _int8_top1(trial, ctx, pruned.model, seconds)
        trial.set_user_attr("accuracy_before", accuracy)
        trial.set_user_attr("fine_tuned", False)
    elif not feasible:
        accuracy = INFEASIBLE_ACCURACY
        trial.set_user_attr("fine_tuned", False)
    else:
        accuracy = _finetune_and_score(trial, ctx, pruned.model, seconds, precision=policy.precision)
    trial.set_user_attr("accuracy", accuracy)
    trial.set_user_attr("seconds", {k: round(v, 2) for k, v in seconds.items()})
    return TrialOutcome(accuracy=accuracy, latency_ms=latency_ms, feasible=feasible)


def _finetune_and_score(
    trial: optuna.Trial, ctx: TrialContext, model: nn.Module, seconds: dict[str, float], *, precision: str = "fp32"
) -> float:
    """BatchNorm recalibration, top-1, fine-tune in FP32, top-1 again (of the INT8 model for ``int8``)."""
    reporter = ctx.reporter
    reporter.phase("recalibrate BatchNorm")
    started = time.perf_counter()
    device = ctx.finetune.device
    recalibrate_batchnorm(model, ctx.data, batches=ctx.bn_batches, seed=trial.number, device=device)
    seconds["bn_recalibration"] = time.perf_counter() - started
    reporter.phase("evaluate")
    started = time.perf_counter()
    before = top1(model, ctx.data, "val", limit=ctx.val_images, device=device)
    seconds["evaluate"] = time.perf_counter() - started
    trial.set_user_attr("accuracy_before", before)

    reporter.phase("fine-tune")
    settings = dataclasses.replace(ctx.finetune, seed=trial.number)
    result = train(model, ctx.data, settings, teacher=ctx.baseline, reporter=reporter, description="fine-tune")
    seconds["finetune"] = result.seconds
    if ctx.promotion is not None:  # what a promotion to rung 1 continues from (FP32, before any quantization)
        path = weights_path(ctx.promotion.folder, trial.number, 0)
        try:
            save_weights(path, model, steps=result.steps, arch_hash=trial.user_attrs.get("arch_hash"))
        except OSError as exc:  # a full disk: the trial keeps its result; only its promotion needs the file
            reporter.warn(
                f"trial {trial.number}'s weights could not be saved ({exc.strerror or exc}): it keeps its "
                "result but cannot be promoted"
            )
    trial.set_user_attr(
        "finetune",
        {
            "steps": result.steps,
            "images_per_second": round(result.images_per_second, 1),
            "final_loss": result.final_loss,
            "distill": settings.distill,
        },
    )
    trial.set_user_attr("fine_tuned", True)

    reporter.phase("evaluate")
    started = time.perf_counter()
    correct = top1_correct(model, ctx.data, "val", limit=ctx.val_images, device=device)
    after = float(correct.mean())
    seconds["evaluate"] += time.perf_counter() - started
    if precision == "int8":
        trial.set_user_attr("accuracy_fp32", after)
        return _int8_top1(trial, ctx, model, seconds)
    whole = reads_whole_split(ctx.data, ctx.val_images)
    trial.set_user_attr("accuracy_record", accuracy_record(correct.tolist(), whole_split=whole))
    return after


def _int8_top1(trial: optuna.Trial, ctx: TrialContext, model: nn.Module, seconds: dict[str, float]) -> float:
    """Quantize ``model`` (fully calibrated) and measure the INT8 model's top-1 in ONNX Runtime."""
    ctx.reporter.phase("quantize")
    quantized = quantize_model(model, ctx.data, ctx.quantize)
    seconds["quantize"] = seconds.get("quantize", 0.0) + quantized.seconds
    ctx.reporter.phase("evaluate INT8 in ONNX Runtime")
    started = time.perf_counter()
    correct = onnx_top1_correct(quantized.int8_onnx, ctx.data, "val", limit=ctx.val_images)
    accuracy = float(correct.mean())
    seconds["evaluate"] = seconds.get("evaluate", 0.0) + time.perf_counter() - started
    measured = accuracy_record(correct.tolist(), whole_split=reads_whole_split(ctx.data, ctx.val_images))
    trial.set_user_attr("accuracy_record", measured)  # the INT8 model's, as the objective
    record = {**trial.user_attrs.get("quantization", {}), "evaluated_in": "onnxruntime"}
    trial.set_user_attr("quantization", {**record, "seconds": round(quantized.seconds, 2)})
    return accuracy


def _baseline_record(trial: optuna.Trial, ctx: TrialContext) -> None:
    """The unpruned FP32 trial's accuracy is the study's baseline top-1, read when the study was created: its
    per-image record from then (older studies kept only the accuracy: its image count and interval then)."""
    if ctx.baseline_record is not None:
        trial.set_user_attr("accuracy_record", ctx.baseline_record)
        return
    images = len(ctx.data.split("val"))
    images = images if ctx.val_images is None else min(images, ctx.val_images)
    if images > 0:
        hits = round(ctx.baseline_accuracy * images)
        record = {"images": images, "correct": hits, "interval": list(wilson(hits, images))}
        trial.set_user_attr("accuracy_record", record)


def _latency(
    trial: optuna.Trial,
    ctx: TrialContext,
    model: nn.Module,
    arch_hash: str,
    precision: str = "fp32",
    seconds: dict[str, float] | None = None,
    fitted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure and store the latency record, or reuse one of this very architecture in the same precision.

    Reused are the one the study made when it chose this recipe (the budget-matched uniform
    ratio), the one that fitted this policy to the budget (``fitted``), or the measurement of an
    earlier trial: a policy picked because it met the budget is judged by the measurement that
    picked it, not by a second one that drift may put on the other side.
    """
    timed = ctx.meter.time_pruned(model, arch_hash, precision, _known(trial, fitted), ctx.reporter)
    if seconds is not None and timed.quantize_seconds:
        seconds["quantize"] = seconds.get("quantize", 0.0) + timed.quantize_seconds
    trial.set_user_attr("latency", timed.record)
    return timed.record


def _known(trial: optuna.Trial, fitted: dict[str, Any] | None) -> Iterator[Known]:
    """Latency records this trial may reuse, in order of preference (earlier trials read only if needed)."""
    created = trial.user_attrs.get(LATENCY_AT_CREATION)
    for chosen, where in ((created, (created or {}).get("chosen_at", "study creation")), (fitted, "budget fit")):
        if chosen:
            yield Known(chosen.get("arch_hash"), chosen.get("precision", "fp32"), chosen, {"measured_at": where})
    for other in _completed(trial):
        if "latency" in other.user_attrs:
            attrs = other.user_attrs
            note = {"reused_from_trial": other.number}
            yield Known(attrs.get("arch_hash"), attrs.get("precision", "fp32"), attrs["latency"], note)


def _baseline_ms(ctx: TrialContext) -> float:
    assert ctx.meter.baseline_ms is not None, "the study's baseline latency is set when the study is opened"
    return ctx.meter.baseline_ms


def _completed(trial: optuna.Trial) -> list[optuna.trial.FrozenTrial]:
    return trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _without_seed(policy: Policy) -> str:
    return dataclasses.replace(policy, seed=0).key()


def _same_policy(trial: optuna.Trial, policy: Policy) -> optuna.trial.FrozenTrial | None:
    """A completed trial with the same policy, unless it used the seeded random criterion."""
    if any(s.criterion == "random" for s in policy.stages.values()):
        return None
    key = _without_seed(policy)
    return next((t for t in _completed(trial) if t.user_attrs.get("policy_key") == key), None)


def _copy_outcome(trial: optuna.Trial, earlier: optuna.trial.FrozenTrial, reporter: Reporter) -> TrialOutcome:
    # The result is copied; who ran this trial and where its policy came from are its own (a sampled policy equal
    # to a recipe is not that recipe: it would count as enqueued, and be credited to the other trial's worker).
    skip = {"policy", "policy_key", "hardware", "worker", "budget_fit", "retry_of", *ENQUEUED_ATTRS}
    for key, value in earlier.user_attrs.items():
        if key not in skip:
            trial.set_user_attr(key, value)
    trial.set_user_attr("duplicate_of", earlier.number)
    trial.set_constraint(LATENCY_CONSTRAINT, float(earlier.user_attrs["budget_violation_ms"]))
    trial.set_user_attr("seconds", {})
    reporter.phase(f"same policy as trial {earlier.number}: reusing its result")
    accuracy, latency_ms = earlier.values
    return TrialOutcome(accuracy=accuracy, latency_ms=latency_ms, feasible=bool(earlier.user_attrs.get("feasible")))
