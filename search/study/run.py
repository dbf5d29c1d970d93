"""The search: an Optuna study over pruning policies, created once and resumed by reruns.

:func:`run_search` opens the storage, loads the data and the space, adopts or trains the
baseline, then creates the study (:mod:`search.study.create`) or joins it (checking that it was
made with the same settings on like hardware), and runs trials until the study has ``trials``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from torch import nn

from search.data.dataset import Dataset
from search.data.loading import load_dataset
from search.errors import UsageError
from search.latency_service.client import TargetLost
from search.measuring.candidate import CandidateMeter, Timer
from search.measuring.isolated import IsolatedTimer
from search.measuring.preflight import check_searchable
from search.measuring.runtimes.registry import require_runtime
from search.measuring.timing import LatencySettings
from search.models.build import build_model, check_model_name
from search.progress import NullReporter, Reporter
from search.pruning.auto_space import space_for
from search.pruning.space import SearchSpace
from search.study.baseline_store import adopt_baseline
from search.study.config import SearchConfig
from search.study.confirm import confirm_front, default_repeats
from search.study.coordination import (
    OVER_BUDGET_FACTOR,
    check_same_hardware,
    check_same_runtime,
    next_step,
    use_study_heartbeat,
    worker_identity,
)
from search.study.coordination import progress as study_progress
from search.study.create import create_study, resumable, resume_creation, sampler
from search.study.creation_clock import CreationClock
from search.study.creator import wait_until_ready
from search.study.folders import first_missing, remove_unused
from search.study.later_setup import finish_later_setup
from search.study.origin import ENQUEUED_ATTRS
from search.study.promotion import prepare_promotion, promote_all, promote_next, promotion_line, promotion_settings
from search.study.retry import RETRY_OF, optimize_one, retries_first
from search.study.settings import (
    check_resumable,
    check_same_data,
    check_same_device_kind,
    finetune_settings,
    quantize_settings,
    settings_that_must_match,
    with_study_fraction,
)
from search.study.storage import HEARTBEAT_SECONDS, discard_if_empty, load_existing, new_sqlite_file, open_storage
from search.study.trial import BASELINE_RECORD, TrialContext, run_trial
from search.study.trial_line import trial_line
from search.training.baseline import Baseline, prepare_baseline
from search.training.device import device_record, loader_plan, precision, resolve

__all__ = ["SearchResult", "run_search"]

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
    stopped: str | None = None
    """Why the run stopped early when it was not Ctrl-C (the latency target was lost)."""


def run_search(config: SearchConfig, reporter: Reporter | None = None, *, timer: Timer | None = None) -> SearchResult:
    """Create or resume the study ``config`` names and run trials until it has enough.

    ``timer`` times every candidate (default: ONNX Runtime here, ``config.threads`` threads); a
    :class:`search.latency_service.client.RemoteTimer` times them on the device that will run the model.
    The study's hardware fingerprint is the timer's.
    """
    reporter = reporter or NullReporter()
    check_model_name(config.model)  # before any data is loaded
    config = replace(config, device=str(resolve(config.device)))  # auto -> cpu or cuda:0; a bad one is refused
    if config.confirm_repeats is None:  # a bad PRUNE_SEARCH_CONFIRM_REPEATS is refused before any work
        config = replace(config, confirm_repeats=default_repeats())
    precision(torch.device(config.device), config.train_dtype)  # fp16 without a GPU is refused before any work
    if timer is None:
        require_runtime(config.runtime)  # a missing package is one line naming it, before any work
        timer = IsolatedTimer(LatencySettings(threads=config.threads, runtime=config.runtime))
    if timer.runtime != config.runtime:
        raise UsageError(
            f"the latency target {timer.where} times in {timer.runtime}, not --runtime {config.runtime}; "
            f"pass --runtime {timer.runtime} or start the target with --runtime {config.runtime}"
        )
    if timer.threads != config.threads:
        raise UsageError(
            f"the latency target {timer.where} times with {timer.threads} thread(s), not --threads {config.threads}; "
            f"pass --threads {timer.threads} or start the target with --threads {config.threads}"
        )
    new_file = new_sqlite_file(config.storage_url)
    promotion = promotion_settings(config)
    made_from = first_missing(promotion.folder) if promotion is not None else None  # before the storage's folder
    storage = open_storage(config.storage_url, config.heartbeat_seconds or HEARTBEAT_SECONDS)
    try:
        return _search(config, storage, reporter, timer)
    except BaseException:  # a refused or interrupted first run leaves no empty database or folders behind
        remove_unused(promotion.folder if promotion is not None else None, made_from)
        discard_if_empty(storage, new_file)
        raise


def _search(config: SearchConfig, storage: RDBStorage, reporter: Reporter, timer: Timer) -> SearchResult:
    """:func:`run_search` once the storage is open."""
    promotion = promotion_settings(config)
    made = first_missing(promotion.folder) if promotion is not None else None
    if promotion is not None:  # its folder is made (or refused) before any work
        prepare_promotion(promotion, config.finetune_steps)
    data, space, fresh = _data_and_space(config, reporter)
    config = config.with_default_rungs(len(data.split("train")))
    if promotion is not None and promotion_settings(config) is None:  # the default rung was cut away
        remove_unused(promotion.folder, made)
    existing = load_existing(storage, config.study_name)
    config = with_study_fraction(config, existing)  # a resumed study keeps its own unless told otherwise
    reporter.info(promotion_line(config, promotion_settings(config), len(data.split("val"))))
    clock = CreationClock(reporter)  # what this run spends before its first trial, phase by phase
    if existing is None:  # refuse what a trial would crash on, before training
        with clock.phase("check that the model can be pruned and exported"):
            check_searchable(config.model, fresh, space, data.example_input())
    else:  # refuse other data (or another runtime) before training a baseline for it
        check_same_data(existing, data, config)
        check_same_runtime(existing, timer.runtime, config.study_name)
    cache_dir = Path(config.studies_dir) / "cache"
    with clock.phase("baseline (load, or train)"):
        adopt_baseline(storage, config, data, cache_dir, reporter)  # a worker joining from another machine
        baseline = prepare_baseline(
            config.model,
            config.weights,
            data,
            cache_dir=cache_dir,
            epochs=config.baseline_epochs,
            seed=config.seed,
            reporter=reporter,
            device=config.device,
            sha256=None if existing is None else (existing.user_attrs.get("settings") or {}).get("baseline_sha256"),
        )
    hardware = timer.fingerprint()
    train_device = device_record(torch.device(config.device))
    train_device["precision"] = precision(torch.device(config.device), config.train_dtype).name  # bf16 ranks apart
    settings = settings_that_must_match(config, data, space, baseline)
    with clock.phase("export the baseline to ONNX"):
        meter = CandidateMeter(baseline.model, data, space=space, timer=timer, quantize=quantize_settings(config))
    try:
        study, created = _create_or_join(
            config, storage, data, space, baseline, meter, settings, hardware, train_device, reporter, clock
        )
    finally:
        clock.stop()
    if not created:
        stored_sha = (study.user_attrs.get("settings") or {}).get("baseline_sha256")
        if baseline.sha256 != stored_sha and adopt_baseline(storage, config, data, cache_dir, reporter):
            return run_search(config, reporter, timer=timer)  # lost the creation race: use the study's baseline
        check_resumable(study, settings, config)
        check_same_hardware(study, hardware, config.study_name)
        check_same_device_kind(study, train_device, config)
        use_study_heartbeat(storage, study, config.heartbeat_seconds)
        reporter.info(f"Resuming study {config.study_name!r} ({study_progress(study).finished} trials so far)")
    ctx, config = _trial_context(study, config, data, space, baseline, meter, hardware, train_device, reporter)
    ran, interrupted, stopped = _run_trials(study, ctx, config, reporter)
    return SearchResult(
        study=study,
        budget_ms=config.budget_ms,
        baseline_latency_ms=study.user_attrs["baseline_latency_ms"],
        baseline_accuracy=study.user_attrs["baseline_accuracy"],
        ran=ran,
        interrupted=interrupted,
        stopped=stopped,
    )


def _create_or_join(
    config: SearchConfig,
    storage: RDBStorage,
    data: Dataset,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    settings: dict[str, Any],
    hardware: dict[str, Any],
    train_device: dict[str, Any],
    reporter: Reporter,
    clock: CreationClock | None = None,
) -> tuple[optuna.Study, bool]:
    """The study, ready, and whether this worker created it (or finished creating it).

    A study another worker is creating is waited for while that worker shows it is alive; one whose
    creator stopped is taken over: finished from its recorded steps when this worker's settings and
    hardware are the study's, else discarded (it has no trials yet) and created again.
    """
    for _ in range(5):  # a study can vanish while waited for (its creator was refused, or discarded it)
        if load_existing(storage, config.study_name) is None:
            try:
                args = (config, storage, data, space, baseline, meter, settings, hardware, train_device, reporter)
                return create_study(*args, clock=clock), True
            except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile: join it
                reporter.info(f"Another worker created study {config.study_name!r} first; joining it")
        study, record = wait_until_ready(storage, config.study_name, reporter)
        if study is None:
            continue
        if record is None:
            return study, False
        why = _why_not_resumable(study, settings, config, hardware)
        if why is None:
            return resume_creation(config, storage, study, record, space, baseline, meter, reporter, clock=clock), True
        if any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):  # never lose a trial
            raise UsageError(f"study {config.study_name!r} was never set up completely yet has trials; use --study NEW")
        reporter.info(f"Discarding the half-built study {config.study_name!r} ({why}) and creating it again")
        optuna.delete_study(study_name=config.study_name, storage=storage)
    raise UsageError(f"study {config.study_name!r} kept disappearing while this worker waited for it; run it again")


def _why_not_resumable(
    study: optuna.Study, settings: dict[str, Any], config: SearchConfig, hardware: dict[str, Any]
) -> str | None:
    """Why a study whose creation stopped cannot be finished by this worker, or None if it can."""
    if not resumable(study):
        return "its creation stopped before a step that can be built on was recorded"
    try:
        check_resumable(study, settings, config)
        check_same_hardware(study, hardware, config.study_name)
    except UsageError as exc:
        return f"it was begun differently: {exc}"
    return None


def _data_and_space(config: SearchConfig, reporter: Reporter) -> tuple[Dataset, SearchSpace, nn.Module]:
    """The data, the space, and a fresh untrained model (built once: it derives the space and is pre-checked)."""
    data = load_dataset(config.data, reporter)
    data.loader_workers, data.pin_memory = loader_plan(torch.device(config.device))
    fresh = build_model(config.model, data.num_classes)
    space = space_for(config.model, config.space, data.num_classes, data.example_input(), model=fresh)
    return data, space.with_precisions(config.precisions), fresh


def _trial_context(
    study: optuna.Study,
    config: SearchConfig,
    data: Dataset,
    space: SearchSpace,
    baseline: Baseline,
    meter: CandidateMeter,
    hardware: dict[str, Any],
    train_device: dict[str, Any],
    reporter: Reporter,
) -> tuple[TrialContext, SearchConfig]:
    """What every trial of this run needs, under what the study decided (precisions, budget, reference)."""
    attrs = study.user_attrs
    space = space.with_precisions(attrs.get("precisions", ["fp32"]))  # what the study decided to search
    config = config.with_budget_ms(float(attrs["budget_ms"]))
    study.sampler = sampler(config, space)
    meter.space = space
    meter.baseline_ms = attrs["baseline_latency_ms"]
    ctx = TrialContext(
        meter=meter,
        baseline_accuracy=attrs["baseline_accuracy"],
        baseline_record=attrs.get(BASELINE_RECORD),
        data=data,
        space=space,
        budget_ms=config.budget_ms,
        finetune=finetune_settings(config),
        bn_batches=config.bn_batches,
        hardware=hardware,
        reporter=reporter,
        val_images=config.val_images,
        fit_budget=config.fit_budget,
        train_device=train_device,
        promotion=promotion_settings(config),
    )
    return ctx, config


def _finished(study: optuna.Study) -> int:
    """Finished trials that count towards ``--trials`` (not interrupted, not stale and retried)."""
    return study_progress(study).finished


def _put_back(trial: optuna.Trial) -> None:
    """Mark ``trial`` interrupted (optuna marks it FAIL) and queue its policy again, to run first on the next run."""
    trial.set_user_attr("interrupted", True)
    kept = {k: trial.user_attrs[k] for k in ENQUEUED_ATTRS if k in trial.user_attrs}
    trial.study.enqueue_trial(trial.params, user_attrs={**kept, RETRY_OF: trial.number})


def _run_trials(
    study: optuna.Study, ctx: TrialContext, config: SearchConfig, reporter: Reporter
) -> tuple[int, bool, str | None]:
    """Run trials one at a time through ``study.optimize`` (which keeps the storage heartbeat).

    Returns the trials run, whether the run stopped early, and why when it was not Ctrl-C.
    """
    started = time.monotonic()
    ran = 0
    lost: list[TargetLost] = []
    retries_first(study)  # a killed trial's retry runs next, in its place, not after the queue

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        reporter.phase(f"trial {trial.number}")
        trial.set_user_attr("worker", worker_identity())
        try:
            outcome = run_trial(trial, ctx)
        except KeyboardInterrupt:
            _put_back(trial)
            raise
        except TargetLost as exc:  # nothing was measured: the trial is put back, as with Ctrl-C
            _put_back(trial)
            trial.set_user_attr("error", "latency target lost")
            lost.append(exc)
            raise
        except Exception as exc:  # recorded on the trial; optuna marks it FAIL and the study goes on
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker failed it
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
                if finish_later_setup(study, ctx, config, reporter):  # what creation left until a trial had run
                    continue
                if promote_next(study, ctx, reporter) is not None:  # ASHA: a due promotion before a new trial
                    continue
                if step[0] == "wait":
                    reporter.phase(f"waiting for {step[1].running} trial(s) running on other workers")
                    time.sleep(2.0)
                else:
                    ran += 1
                    if not optimize_one(study, objective, mine):
                        reporter.warn(
                            "another worker marked this worker's trial as stale while it ran; its policy is retried"
                        )
            except KeyboardInterrupt:
                return ran, True, None
            except TargetLost as exc:  # while the set-up after the first trial timed a policy
                return ran, True, str(exc)
            if lost:
                return ran, True, str(lost[0])
            if mine and mine[0].state == TrialState.COMPLETE:
                reporter.info(trial_line(mine[0]))
            done = min(_finished(study), config.trials)
            progress.advance(done - shown)
            shown = done
    try:  # the promotions the last trials made due (or a killed worker left), until none is
        deadline = None if config.timeout is None else started + config.timeout
        promote_all(study, ctx, reporter, deadline, config.trials)
        confirm_front(study, ctx.meter, reporter, config.confirm_repeats or 0, deadline)  # the front, timed again
    except KeyboardInterrupt:
        return ran, True, None
    except TargetLost as exc:
        return ran, True, str(exc)
    now = study_progress(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting and now.finished >= config.trials:
        reporter.info(
            f"{waiting} enqueued polic{'y was' if waiting == 1 else 'ies were'} not run (the study reached --trials "
            "first); they stay queued in the study (the dashboard shows them waiting) and run if --trials is raised"
        )
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
    return ran, False, None
