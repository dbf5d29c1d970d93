"""The search: an Optuna study over pruning policies, created once and resumed by reruns.

Creating a study measures the unpruned model's latency (the study's reference for every
drift-corrected latency), checks that the budget is reachable at all, and enqueues the
unpruned model and the space's uniform recipes so every study contains them. Rerunning the
same command finds the study in its storage and goes on until it has ``trials`` trials.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.baseline import Baseline, prepare_baseline
from search.baseline_store import adopt_baseline, publish_baseline
from search.config import SearchConfig
from search.coordination import (
    OVER_BUDGET_FACTOR,
    TrialSeededSampler,
    check_same_hardware,
    mark_ready,
    next_step,
    use_study_heartbeat,
    wait_until_ready,
    worker_identity,
)
from search.coordination import progress as study_progress
from search.data import Dataset, load_dataset
from search.errors import UsageError
from search.evaluate import top1
from search.finetune import TrainSettings
from search.hardware import fingerprint, git_revision, package_versions
from search.latency import LatencySettings, export_onnx, measure
from search.models import model_family
from search.policy import Policy
from search.progress import NullReporter, Reporter
from search.quantize import QuantizeSettings, choose_precisions
from search.recipes import global_grid, latency_records, study_recipes
from search.space import SearchSpace, default_space_path, load_space
from search.storage import HEARTBEAT_SECONDS, load_existing, open_storage
from search.trial import LATENCY_AT_CREATION, TrialContext, run_trial
from search.trial_origin import is_enqueued, origin

__all__ = ["SearchResult", "run_search", "settings_that_must_match"]

optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported through the Reporter
warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)


@dataclass
class SearchResult:
    study: optuna.Study
    budget_ms: float
    baseline_latency_ms: float
    baseline_accuracy: float
    ran: int
    """Trials run by this invocation."""
    interrupted: bool = False


def settings_that_must_match(
    config: SearchConfig, data: Dataset, space: SearchSpace, baseline: Baseline
) -> dict[str, Any]:
    """What a resumed study must share with the run that created it, or its numbers mix."""
    return {
        "budget": config.budget_ms if config.budget_ms is not None else f"{config.budget_fraction:g}x",
        "model": config.model,
        "baseline_sha256": baseline.sha256,
        "data_fingerprint": data.fingerprint,
        "input_size": data.input_size,
        "space_sha256": hashlib.sha256(Path(space.path).read_bytes()).hexdigest()[:16],
        "threads": config.threads,
        "finetune_steps": config.finetune_steps,
        "finetune_batch": config.finetune_batch,
        "finetune_lr": config.finetune_lr,
        "distill": config.distill,
        "bn_batches": config.bn_batches,
        "val_images": config.val_images,
        "precisions": list(config.precisions),
        "calibration_method": config.calibration_method,
        "calibration_images": config.calibration_images,
    }


_FLAGS = {
    "budget": "--budget-ms/--budget-fraction",
    "model": "--model",
    "baseline_sha256": "--weights",
    "data_fingerprint": "--data",
    "input_size": "--input-size",
    "space_sha256": "--space (its contents)",
    "threads": "--threads",
    "finetune_steps": "--finetune-steps",
    "finetune_batch": "--finetune-batch",
    "finetune_lr": "--finetune-lr",
    "distill": "--distill",
    "bn_batches": "--bn-batches",
    "val_images": "--val-images",
    "precisions": "--precision",
    "calibration_method": "--calibration-method",
    "calibration_images": "--calibration-images",
}


def run_search(config: SearchConfig, reporter: Reporter | None = None) -> SearchResult:
    """Create or resume the study ``config`` names and run trials until it has enough."""
    reporter = reporter or NullReporter()
    storage = open_storage(config.storage_url, config.heartbeat_seconds or HEARTBEAT_SECONDS)
    data = load_dataset(config.data, reporter)
    space = load_space(config.space or default_space_path(model_family(config.model)))
    space = space.with_precisions(config.precisions)
    studies_dir = Path(config.studies_dir)
    adopt_baseline(storage, config, data, studies_dir / "cache", reporter)  # a worker joining from another machine
    baseline = prepare_baseline(
        config.model,
        config.weights,
        data,
        cache_dir=studies_dir / "cache",
        epochs=config.baseline_epochs,
        seed=config.seed,
        reporter=reporter,
    )
    latency = LatencySettings(threads=config.threads)
    hardware = fingerprint(config.threads)
    settings = settings_that_must_match(config, data, space, baseline)
    baseline_onnx = export_onnx(baseline.model, data.example_input())
    study = load_existing(storage, config.study_name)
    created = False
    if study is None:
        try:
            study = _create_study(
                config, storage, data, space, baseline, baseline_onnx, latency, settings, hardware, reporter
            )
            publish_baseline(storage, study, baseline)
            mark_ready(study, config.heartbeat_seconds or HEARTBEAT_SECONDS)
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile: join it
            reporter.info(f"Another worker created study {config.study_name!r} first; joining it")
    if not created:
        study = wait_until_ready(storage, config.study_name, reporter)
        stored_sha = (study.user_attrs.get("settings") or {}).get("baseline_sha256")
        if baseline.sha256 != stored_sha and adopt_baseline(storage, config, data, studies_dir / "cache", reporter):
            return run_search(config, reporter)  # lost the creation race with a baseline trained here: use the study's
        _check_resumable(study, settings, config)
        check_same_hardware(study, hardware, config.study_name)
        use_study_heartbeat(storage, study, config.heartbeat_seconds)
        reporter.info(f"Resuming study {config.study_name!r} ({len(study.trials)} trials so far)")
    space = space.with_precisions(study.user_attrs.get("precisions", ["fp32"]))  # what the study decided to search
    config = config.with_budget_ms(float(study.user_attrs["budget_ms"]))
    study.sampler = _sampler(config, space)
    attrs = study.user_attrs
    ctx = TrialContext(
        baseline=baseline.model,
        baseline_onnx=baseline_onnx,
        baseline_latency_ms=attrs["baseline_latency_ms"],
        baseline_accuracy=attrs["baseline_accuracy"],
        data=data,
        space=space,
        budget_ms=config.budget_ms,
        latency=latency,
        finetune=TrainSettings(
            steps=config.finetune_steps,
            batch_size=config.finetune_batch,
            lr=config.finetune_lr,
            distill=config.distill,
            train_dtype=config.train_dtype,
        ),
        bn_batches=config.bn_batches,
        hardware=hardware,
        reporter=reporter,
        quantize=_quantize_settings(config),
        val_images=config.val_images,
        fit_budget=config.fit_budget,
    )
    ran, interrupted = _run_trials(study, ctx, config, reporter)
    return SearchResult(
        study=study,
        budget_ms=config.budget_ms,
        baseline_latency_ms=attrs["baseline_latency_ms"],
        baseline_accuracy=attrs["baseline_accuracy"],
        ran=ran,
        interrupted=interrupted,
    )


def _create_study(
    config: SearchConfig,
    storage: optuna.storages.BaseStorage,
    data: Dataset,
    space: SearchSpace,
    baseline: Baseline,
    baseline_onnx: bytes,
    latency: LatencySettings,
    settings: dict[str, Any],
    hardware: dict[str, Any],
    reporter: Reporter,
) -> optuna.Study:
    shape = tuple(data.example_input().shape)
    reporter.phase("measure the baseline")
    base = measure(baseline_onnx, shape, latency)
    reporter.info(
        f"Baseline latency: {base.median_ms:.2f} ms median, {base.p90_ms:.2f} ms p90 "
        f"(ONNX Runtime, {config.threads} thread{'s' if config.threads > 1 else ''}, batch 1, "
        f"{data.input_size}x{data.input_size})"
    )
    if config.budget_fraction is not None:
        config = config.with_budget_ms(round(config.budget_fraction * base.median_ms, 4))
        reporter.info(f"Budget: {config.budget_ms:g} ms ({settings['budget']} of the unpruned model)")
    precisions, int8_check = choose_precisions(
        space.precisions, baseline.model, baseline_onnx, data, _quantize_settings(config), latency, reporter
    )
    space = space.with_precisions(precisions)
    fastest_ms = _fastest_reachable(
        space, baseline, data, baseline_onnx, latency, base.median_ms, reporter, _quantize_settings(config)
    )
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
    reporter.phase("evaluate the baseline")
    accuracy = top1(baseline.model, data, "val", limit=config.val_images, reporter=reporter)
    reporter.info(f"Baseline top-1 on {data.name} val: {accuracy:.4f}")
    study = optuna.create_study(
        study_name=config.study_name,
        storage=storage,
        directions=["maximize", "minimize"],
        sampler=_sampler(config, space),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "latency_ms"])
    for key, value in {
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
        "space": {"path": space.path, "text": Path(space.path).read_text()},
        "hardware": hardware,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }.items():
        study.set_user_attr(key, value)
    quantize = _quantize_settings(config)

    def record_of(policy: Policy) -> dict[str, Any]:
        return latency_records(
            policy, (policy.precision,), space, baseline.model, data, baseline_onnx, base.median_ms, latency, quantize
        )[policy.precision]

    def global_grid_of(precision: str) -> list[tuple[float, Policy]]:
        return global_grid(space, baseline.model, data.example_input(), precision)

    recipes = study_recipes(
        space, config.budget_ms, base.median_ms, record_of, reporter, global_grid_of, seed=config.seed
    )
    for recipe in recipes:
        attrs: dict[str, Any] = {"recipe": recipe.label} if recipe.label else {"start": "near the budget"}
        if recipe.latency is not None:
            attrs[LATENCY_AT_CREATION] = recipe.latency
        study.enqueue_trial(space.params_for(recipe.policy), user_attrs=attrs, skip_if_exists=True)
    labelled = sum(1 for r in recipes if r.label)
    reporter.info(
        f"Created study {config.study_name!r} in {config.storage_url}; enqueued {labelled} recipes"
        f" and {len(recipes) - labelled} start-up policies near the budget"
    )
    return study


def _fastest_reachable(
    space: SearchSpace,
    baseline: Baseline,
    data: Dataset,
    baseline_onnx: bytes,
    latency: LatencySettings,
    baseline_ms: float,
    reporter: Reporter,
    quantize: QuantizeSettings | None = None,
) -> float:
    """Measured latency of the most aggressive policies the space allows (one per rounding and precision)."""
    reporter.phase("measure the fastest policy the space allows")
    best = float("inf")
    for policy in space.fastest_policies():
        records = latency_records(
            policy,
            space.precisions,
            space,
            baseline.model,
            data,
            baseline_onnx,
            baseline_ms,
            latency,
            quantize or QuantizeSettings(),
        )
        best = min(best, min(r["corrected_ms"] for r in records.values()))
    reporter.info(f"Fastest policy in the space: {best:.2f} ms")
    return best


def _check_resumable(study: optuna.Study, settings: dict[str, Any], config: SearchConfig) -> None:
    stored = study.user_attrs.get("settings")
    if stored is None:
        raise UsageError(
            f"study {config.study_name!r} in {config.storage_url} was not made by this tool; pick another --study name"
        )
    for key, value in settings.items():
        if key in stored and stored[key] != value:
            raise UsageError(
                f"study {config.study_name!r} was created with a different {_FLAGS.get(key, key)} "
                f"({stored[key]!r}, now {value!r}); rerun with the same settings to resume, or pass --study NEW"
            )


def _sampler(config: SearchConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """Multi-objective TPE; it honours the latency constraint each trial sets (``Trial.set_constraint``)."""
    recipes = 1 + len(space.uniform_ratios) + (1 if len(space.precisions) > 1 else 0) + 2 * len(space.precisions)
    return TrialSeededSampler(seed=config.seed, n_startup_trials=recipes + 3)


def _quantize_settings(config: SearchConfig) -> QuantizeSettings:
    return QuantizeSettings(calibration_method=config.calibration_method, calibration_images=config.calibration_images)


def _finished(study: optuna.Study) -> int:
    """Finished trials that count towards ``--trials`` (not interrupted, not stale and retried)."""
    return study_progress(study).finished


def _run_trials(study: optuna.Study, ctx: TrialContext, config: SearchConfig, reporter: Reporter) -> tuple[int, bool]:
    """Run trials one at a time through ``study.optimize`` (which keeps the storage heartbeat)."""
    started = time.monotonic()
    ran = 0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        reporter.phase(f"trial {trial.number}")
        trial.set_user_attr("worker", worker_identity())
        try:
            outcome = run_trial(trial, ctx)
        except KeyboardInterrupt:
            # The trial is marked FAIL by optuna; its policy goes back in the queue for the next run.
            trial.set_user_attr("interrupted", True)
            kept = {k: trial.user_attrs[k] for k in ("recipe", "start", LATENCY_AT_CREATION) if k in trial.user_attrs}
            trial.study.enqueue_trial(trial.params, user_attrs=kept or None)
            raise
        except Exception as exc:  # recorded on the trial; optuna marks it FAIL and the study goes on
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            trial.set_user_attr("error", message)
            reporter.warn(f"trial {trial.number} failed: {message}")
            raise
        return outcome.accuracy, outcome.latency_ms

    with reporter.task("trials", config.trials) as progress:
        shown = min(_finished(study), config.trials)
        progress.advance(shown)
        # Other workers may share the study: start a trial only while finished + running trials are
        # short of the total, and wait for (or fail, once their heartbeat stops) other workers' trials.
        mine: list[optuna.trial.FrozenTrial] = []  # the trial this worker just ran
        while (step := next_step(study, config.trials))[0] != "done":
            if config.timeout is not None and time.monotonic() - started > config.timeout:
                reporter.info(f"Timeout of {config.timeout:g} s reached; rerun the command to go on")
                break
            mine.clear()
            try:
                if step[0] == "wait":
                    reporter.phase(f"waiting for {step[1].running} trial(s) running on other workers")
                    time.sleep(2.0)
                else:
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(Exception,),
                        gc_after_trial=False,
                        callbacks=[lambda _study, trial: mine.append(trial)],
                    )
                    ran += 1
            except KeyboardInterrupt:
                return ran, True
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it: its heartbeat was late
                reporter.warn("another worker marked this worker's trial as stale while it ran; its policy is retried")
            if mine and mine[0].state == TrialState.COMPLETE:
                reporter.info(_trial_line(mine[0]))
            done = min(_finished(study), config.trials)
            progress.advance(done - shown)
            shown = done
    now = study_progress(study)
    if now.over_budget:
        reporter.info(
            f"{now.over_budget} sampled policies were over the budget: measured and recorded, "
            "not fine-tuned, not counted towards --trials"
        )
    if now.gave_up(config.trials) and now.finished < config.trials:
        reporter.warn(
            f"stopped after {now.over_budget} sampled policies over the budget ({OVER_BUDGET_FACTOR}x --trials) "
            f"with {now.finished} of {config.trials} trials; narrow the space's ranges towards the budget (--space)"
        )
    return ran, False


def _trial_line(t: optuna.trial.FrozenTrial) -> str:
    number = t.number
    attrs = t.user_attrs
    latency = attrs["latency"]
    status = "within budget" if attrs["feasible"] else "over budget, not fine-tuned"
    if not attrs["feasible"] and not is_enqueued(attrs):
        status += ", not counted"
    evaluated = attrs.get("fine_tuned") or Policy.from_dict(attrs["policy"]).is_unpruned
    accuracy = f"top-1 {attrs['accuracy']:.4f}" if evaluated else "top-1 -"
    if attrs.get("fine_tuned"):
        accuracy += f" (before fine-tune {attrs['accuracy_before']:.4f})"
    if attrs.get("precision") == "int8":  # accuracy run in ONNX Runtime; before/after fine-tune are FP32
        accuracy = f"INT8 {accuracy}" if evaluated else "INT8, top-1 -"
        if "accuracy_fp32" in attrs:
            accuracy = accuracy[:-1] + f", FP32 after {attrs['accuracy_fp32']:.4f})"
    label = origin(attrs)
    recipe = f" [{label}]" if label else ""
    took = sum(attrs.get("seconds", {}).values())
    return (
        f"Trial {number}{recipe}: {latency['corrected_ms']:.2f} ms ({latency['ratio']:.0%} of baseline), "
        f"{accuracy}, {status}, {took:.0f} s"
    )
