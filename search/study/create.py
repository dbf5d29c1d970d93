"""Setting a new study up, as a short sequence of named steps.

Time the unpruned model (the study's reference for every drift-corrected latency), resolve the
budget, decide the precisions to search (INT8 only where it is measured faster), check that the
budget is reachable at all, score the baseline, record the study's provenance, and enqueue the
recipes so every study contains them. Each step is a call into one room.

The study's name is claimed first, and the creator keeps a heartbeat on it while it works
(:mod:`search.study.creator`); each finished step is recorded, so a worker that takes creation
over from a stopped creator finishes it from there (:func:`resume_creation`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.candidate import CandidateMeter
from search.measuring.hardware import git_revision, package_versions
from search.measuring.int8_check import Int8Check, choose_precisions
from search.measuring.timing import Latency
from search.progress import Reporter
from search.pruning.policy import Policy
from search.pruning.recipes import Recipe, first_recipes, global_grid
from search.pruning.space import SearchSpace
from search.study.baseline_store import publish_baseline
from search.study.clocked import clocked_measured
from search.study.config import SearchConfig
from search.study.coordination import TrialSeededSampler, mark_ready
from search.study.creation_clock import CreationClock, creation_line
from search.study.creator import CreatorHeartbeat, claim, creating, record_step, steps_done
from search.study.enqueue import enqueue_recipes
from search.study.later_setup import DEFERRED
from search.study.sensitivity import engine_line, read_engine
from search.study.storage import HEARTBEAT_SECONDS, masked
from search.study.trial import BASELINE_RECORD, READ_ENGINE
from search.study.uncertainty import accuracy_record
from search.training.baseline import Baseline
from search.training.device import precision
from search.training.evaluate import read_top1_correct, reads_whole_split

__all__ = ["create_study", "fastest_reachable", "resumable", "resume_creation", "sampler"]


def create_study(
    config: SearchConfig,
    storage: optuna.storages.RDBStorage,
    data: Dataset,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    settings: dict[str, Any],
    hardware: dict[str, Any],
    train_device: dict[str, Any],
    reporter: Reporter,
    clock: CreationClock | None = None,
) -> optuna.Study:
    """Create study ``config.study_name`` in ``storage``, set it up and mark it ready (sets ``meter.baseline_ms``).

    ``clock`` times the phases (run before it by the caller too: the baseline) and records them on the
    study (:mod:`search.study.creation_clock`).

    The name is claimed first, so other workers wait for this one (it keeps a heartbeat meanwhile,
    :mod:`search.study.creator`). Raises :class:`UsageError` when the budget cannot be met, and the
    study is deleted again. Raises optuna's ``DuplicatedStudyError`` when another worker created it first.
    """
    study = optuna.create_study(
        study_name=config.study_name,
        storage=storage,
        directions=["maximize", "minimize"],
        sampler=sampler(config, space),
    )
    record = claim(storage, study, None, "measure the baseline")
    if record is None:  # a waiting worker took it over in the instant before this one claimed it
        raise optuna.exceptions.DuplicatedStudyError(f"study {config.study_name!r} is being created elsewhere")
    with creating(storage, study, record) as beat:
        told = beat.reporter(reporter)
        clock = _clock(clock, told, study)
        with clock.phase("measure the baseline's latency"):
            base = _time_baseline(meter, config, data, told)
        config = _resolve_budget(config, base, settings, told)
        with clock.phase("INT8 check"):
            precisions, int8_check = choose_precisions(space.precisions, meter, told)
        space = space.with_precisions(precisions)
        meter.space = space
        with clock.phase("measure the fastest policy the space allows"):
            fastest_ms = fastest_reachable(space, meter, told)
        _check_budget(config, space, fastest_ms, base, told)
        with clock.phase("choose the engine that reads the validation images"):
            bf16 = precision(torch.device(config.device), config.train_dtype).name == "bf16"
            engine = read_engine(meter, baseline.model, config.device, config.val_images, bf16=bf16)
        study.set_user_attr(READ_ENGINE, engine)
        told.info(engine_line(engine))
        with clock.phase("evaluate the baseline"):
            correct = read_top1_correct(
                baseline.model, data, "val", limit=config.val_images, device=config.device, engine=engine["engine"]
            )
            accuracy = float(correct.mean())
        told.info(f"Baseline top-1 on {data.name} val: {accuracy:.4f}")
        _warn_near_chance(accuracy, data, told, trained_here=baseline.trained_here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["accuracy", "latency_ms"])
        provenance = _provenance(
            config, data, space, baseline, base, accuracy, fastest_ms, int8_check, settings, hardware, train_device
        )
        whole = reads_whole_split(data, config.val_images)
        provenance[BASELINE_RECORD] = accuracy_record(correct.tolist(), whole_split=whole)  # pairs with the trials
        for key, value in provenance.items():
            study.set_user_attr(key, value)
        study.set_user_attr("latency_measured_on", meter.timer.where)  # "local", or the latency target's URL
        record_step(study, PROVENANCE)
        return _finish(config, storage, study, space, baseline, meter, told, beat, clock)


PROVENANCE = "baseline measured and settings recorded"
RECIPES = "recipes enqueued"
BASELINE_STORED = "baseline stored"


def resumable(study: optuna.Study) -> bool:
    """Whether a study whose creation stopped can be finished from its recorded steps."""
    done = steps_done(study)
    return PROVENANCE in done and (RECIPES in done or not study.get_trials(deepcopy=False))


def resume_creation(
    config: SearchConfig,
    storage: optuna.storages.RDBStorage,
    study: optuna.Study,
    record: str,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    reporter: Reporter,
    clock: CreationClock | None = None,
) -> optuna.Study:
    """Finish creating ``study`` (this worker claimed it as ``record``) after the steps already recorded."""
    with creating(storage, study, record) as beat:
        told = beat.reporter(reporter)
        clock = _clock(clock, told, study)
        attrs = study.user_attrs
        config = config.with_budget_ms(float(attrs["budget_ms"]))
        space = space.with_precisions(attrs.get("precisions", ["fp32"]))
        meter.space = space
        meter.baseline_ms = attrs["baseline_latency_ms"]
        told.info(
            f"Finishing the creation of study {config.study_name!r}; kept from before: {', '.join(steps_done(study))}"
        )
        return _finish(config, storage, study, space, baseline, meter, told, beat, clock)


def _clock(clock: CreationClock | None, reporter: Reporter, study: optuna.Study) -> CreationClock:
    """``clock`` (or a new one) saying its lines through ``reporter`` and recording on ``study``."""
    clock = clock or CreationClock(reporter)
    clock.reporter = reporter  # the creator's reporter: each phase is also shown to waiting workers
    clock.attach(study)
    return clock


def _finish(
    config: SearchConfig,
    storage: optuna.storages.RDBStorage,
    study: optuna.Study,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    reporter: Reporter,
    beat: CreatorHeartbeat,
    clock: CreationClock,
) -> optuna.Study:
    """The creation steps after the provenance, each skipped when already recorded; then the study is ready."""
    if RECIPES not in steps_done(study):
        recipes = _recipes(config, space, baseline, meter, reporter, clock)
        enqueue_recipes(study, space, recipes, config.budget_ms)
        if meter.baseline_ms > config.budget_ms:  # the latency-aware recipe and the start-up samples: after a trial
            study.set_user_attr(DEFERRED, True)
        record_step(study, RECIPES)
        labelled = sum(1 for r in recipes if r.label)
        reporter.info(
            f"Created study {config.study_name!r} in {masked(config.storage_url)}; enqueued {labelled} recipes (the"
            " latency-aware recipe and the start-up policies near the budget follow once the first trial has run)"
        )
    if BASELINE_STORED not in steps_done(study):
        with clock.phase("store the baseline with the study"):
            publish_baseline(storage, study, baseline)
        record_step(study, BASELINE_STORED)
    clock.settle()
    clock.stop()
    line = creation_line(study)
    if line:
        reporter.info(line)
    beat.stop()
    mark_ready(study, config.heartbeat_seconds or HEARTBEAT_SECONDS)
    return study


def _time_baseline(meter: CandidateMeter, config: SearchConfig, data: Dataset, reporter: Reporter) -> Latency:
    reporter.phase("measure the baseline")
    base = meter.time_baseline()
    meter.baseline_ms = base.median_ms
    reporter.info(
        f"Baseline latency: {base.median_ms:.2f} ms median, {base.p90_ms:.2f} ms p90 "
        f"(ONNX Runtime, {config.threads} thread{'s' if config.threads > 1 else ''}, batch 1, "
        f"{data.input_size}x{data.input_size})"
    )
    return base


def _resolve_budget(config: SearchConfig, base: Latency, settings: dict[str, Any], reporter: Reporter) -> SearchConfig:
    """``--budget-fraction`` in milliseconds of the baseline just measured (the study stores the ms)."""
    if config.budget_fraction is None:
        return config
    config = config.with_budget_ms(round(config.budget_fraction * base.median_ms, 4))
    reporter.info(f"Budget: {config.budget_ms:g} ms ({settings['budget']} of the unpruned model)")
    return config


def fastest_reachable(space: SearchSpace, meter: CandidateMeter, reporter: Reporter) -> float:
    """Measured latency of the most aggressive policies the space allows (one per rounding and precision)."""
    reporter.phase("measure the fastest policy the space allows")
    best = float("inf")
    for policy in space.fastest_policies():
        records = meter.records(policy, space.precisions)
        best = min(best, min(r["corrected_ms"] for r in records.values()))
    reporter.info(f"Fastest policy in the space: {best:.2f} ms")
    return best


def _check_budget(
    config: SearchConfig, space: SearchSpace, fastest_ms: float, base: Latency, reporter: Reporter
) -> None:
    """Refuse a budget no policy of the space meets; warn when the unpruned model meets it already."""
    assert config.budget_ms is not None
    if config.budget_ms < fastest_ms:
        raise UsageError(
            f"budget {config.budget_ms:g} ms is below the fastest policy space {Path(space.path).name} "
            f"reaches ({fastest_ms:.2f} ms; unpruned {base.median_ms:.2f} ms); raise --budget-ms or "
            f"widen the space's ratio ranges"
        )
    if base.median_ms <= config.budget_ms:
        reporter.warn(
            f"the unpruned model already meets the budget ({base.median_ms:.2f} <= {config.budget_ms:g} ms): "
            f"the search can only trade accuracy for more speed"
        )


NEAR_CHANCE = 1.5
"""A baseline whose top-1 is below this many times chance (1 / classes) is warned about."""


def _warn_near_chance(accuracy: float, data: Dataset, reporter: Reporter, *, trained_here: bool = False) -> None:
    """Say so when the baseline scores near chance: most often weights whose class order is not the data's,
    or (for a baseline trained here) too few epochs or labels that do not match the images."""
    chance = 1 / data.num_classes
    if data.num_classes > 1 and accuracy < NEAR_CHANCE * chance:
        head = (
            f"the baseline's top-1 on {data.name} val is {accuracy:.1%}, near chance ({chance:.1%} for "
            f"{data.num_classes} classes): "
        )
        if trained_here:
            reporter.warn(
                head + "the baseline trained here (no --weights given) learned little; pass more "
                "--baseline-epochs, or check that the images and their class folders/labels match"
            )
            return
        shown = ", ".join(data.classes[:6]) + (", ..." if data.num_classes > 6 else "")
        reporter.warn(
            head + f"check that --weights were trained on this data with the classes in "
            f"this order ({shown}) and with the same --mean/--std"
        )


def _provenance(
    config: SearchConfig,
    data: Dataset,
    space: SearchSpace,
    baseline: Baseline,
    base: Latency,
    accuracy: float,
    fastest_ms: float,
    int8_check: Int8Check | None,
    settings: dict[str, Any],
    hardware: dict[str, Any],
    train_device: dict[str, Any],
) -> dict[str, Any]:
    """What the study records about how it was made (user attributes, shown by the dashboard)."""
    return {
        "baseline_latency_ms": base.median_ms,
        "baseline_latency_p90_ms": base.p90_ms,
        "baseline_accuracy": accuracy,
        "fastest_policy_ms": fastest_ms,
        "precisions": list(space.precisions),
        "int8_check": None if int8_check is None else int8_check.to_dict(),
        "budget_ms": config.budget_ms,
        "settings": settings,
        "config": config.to_dict(),
        "baseline": {
            "model": baseline.model_name,
            "weights": baseline.weights,
            "sha256": baseline.sha256,
            "trained_here": baseline.trained_here,
        },
        "data": {
            "name": data.name,
            "classes": data.classes,
            "input_size": data.input_size,
            "mean": list(data.mean),
            "std": list(data.std),
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test) if data.test is not None else 0,
        },
        "space": {"path": space.path, "text": space.text},
        "hardware": hardware,
        "train_device": train_device,
        "augmentation": data.transforms(),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _recipes(
    config: SearchConfig,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    reporter: Reporter,
    clock: CreationClock,
) -> list[Recipe]:
    """The recipes a new study runs first (:func:`search.pruning.recipes.first_recipes`); the latency-aware
    recipe and the start-up samples wait until a trial has run (:mod:`search.study.later_setup`)."""
    assert config.budget_ms is not None and meter.baseline_ms is not None

    def global_grid_of(precision: str) -> list[tuple[float, Policy]]:
        with clock.phase("global magnitude allocations"):
            return global_grid(space, baseline.model, meter.data.example_input(), precision)

    measured = clocked_measured(meter, clock)
    return first_recipes(space, config.budget_ms, measured, reporter, global_grid_of, phase=clock.phase)


def sampler(config: SearchConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """``--sampler`` (multi-objective TPE by default), seeded per trial; it honours the latency constraint each
    trial sets (``Trial.set_constraint``). Its start-up trials are the recipes and the samples near the budget."""
    recipes = 1 + len(space.uniform_ratios) + (1 if len(space.precisions) > 1 else 0) + 3 * len(space.precisions)
    return TrialSeededSampler(seed=config.seed, n_startup_trials=recipes + 3, kind=config.sampler)
