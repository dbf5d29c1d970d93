"""A real SQLite study on tiny settings: recipes first, trials recorded, resumed, faults survived."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from search.data.spec import DataSpec
from search.errors import UsageError
from search.progress import RecordingReporter
from search.study import trial as trial_module
from search.study.config import SearchConfig
from search.study.front import pareto_front, recommended, rows
from search.study.run import run_search
from tests.conftest import run_main


@pytest.fixture()
def config(tmp_path: Path, trained_weights: Path) -> SearchConfig:
    return SearchConfig(
        budget_ms=1e6,  # replaced per test with a budget relative to the measured baseline
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=32),
        study="tiny",
        trials=6,
        finetune_steps=2,
        bn_batches=2,
        studies_dir=str(tmp_path / "studies"),
    )


@pytest.mark.slow
def test_study_records_recipes_trials_and_resumes(config: SearchConfig) -> None:
    # A budget relative to the unpruned model the study itself measures: immune to drift between runs.
    config = replace(config, budget_ms=None, budget_fraction=0.8, study=None)
    assert config.study_name == "resnet18-digits-0.8x"
    # A short search (--trials 1) ends with a policy within the budget: the recipes creation measured within
    # it run first, not the unpruned model or a fixed recipe over it.
    short = run_search(replace(config, trials=1))
    only = short.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(only) == 1 and "latency_at_creation" in only[0].user_attrs, only[0].user_attrs
    assert only[0].user_attrs["recipe"] != "unpruned" and only[0].user_attrs["feasible"]
    best = recommended(rows(short.study))
    assert best is not None and best.latency_ms <= short.budget_ms, "not 'No policy within the budget yet'"

    reporter = RecordingReporter()
    result = run_search(config, reporter)
    study = result.study
    budget = result.budget_ms
    assert budget == pytest.approx(0.8 * study.user_attrs["baseline_latency_ms"], rel=1e-3)
    assert study.user_attrs["budget_ms"] == budget
    # In the order they ran (the latency-aware recipe is enqueued after the first trial, numbered after the rest).
    trials = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.datetime_start)
    assert len(trials) == 6
    # What creation measured within the budget runs first; then the unpruned model and the fixed recipes.
    labels = [t.user_attrs["recipe"] for t in trials]
    chosen = [t.user_attrs.get("latency_at_creation") for t in trials]
    known = [
        t
        for t, c in zip(trials, chosen, strict=True)
        if t.user_attrs.get("recipe") and c and c["corrected_ms"] <= budget
    ]
    assert known and trials[: len(known)] == known, labels
    assert all(t.user_attrs["feasible"] for t in known)
    assert trials[len(known)].user_attrs["recipe"] == "unpruned"

    unpruned = trials[len(known)]
    assert unpruned.user_attrs["feasible"] is False, "the unpruned model is over a budget of 80% of itself"
    assert unpruned.user_attrs["fine_tuned"] is False
    assert unpruned.values[0] == pytest.approx(study.user_attrs["baseline_accuracy"])
    half = next(t for t in known if t.user_attrs["recipe"].startswith("uniform"))  # e.g. "uniform 0.5 l1 at the budget"
    assert half.user_attrs["feasible"] is True and half.user_attrs["fine_tuned"] is True
    for key in (
        "policy",
        "channels",
        "latency",
        "macs",
        "params",
        "accuracy_before",
        "accuracy",
        "seconds",
        "hardware",
    ):
        assert key in half.user_attrs, key
    assert 0 < half.user_attrs["channels"]["layer4.0.conv1"] < 512
    assert set(half.user_attrs["latency"]) >= {"median_ms", "p90_ms", "ratio", "corrected_ms", "baseline_median_ms"}
    assert half.values[1] == pytest.approx(
        half.user_attrs["latency"]["ratio"] * study.user_attrs["baseline_latency_ms"], rel=1e-3
    )
    assert half.constraints["latency_over_budget_ms"] <= 0 < unpruned.constraints["latency_over_budget_ms"]
    assert set(half.user_attrs["seconds"]) >= {"prune", "latency", "bn_recalibration", "finetune", "evaluate"}
    for key in ("baseline_latency_ms", "budget_ms", "settings", "versions", "hardware", "space"):
        assert key in study.user_attrs, key
    assert any(f"Trial {trials[3].number}" in line for line in reporter.infos)

    best = recommended(rows(study))
    assert best is not None and best.latency_ms <= budget
    assert best in pareto_front(rows(study))

    # Running the same search again with a larger --trials resumes the study.
    resumed = run_search(replace(config, trials=9))
    assert resumed.study.study_name == "resnet18-digits-0.8x"
    assert resumed.budget_ms == budget, "a resumed study keeps the budget it resolved when it was created"
    trials = resumed.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 9
    assert resumed.ran == 3

    # The uniform ratio and the global magnitude allocation that just meet the budget are recipes too
    # (INT8 alone meets 80% here), then come start-up samples near the budget (random ones mostly miss
    # a tight budget). The recipes are judged by the full timing that chose them when the study was created,
    # so drift cannot put them over the budget; the start-up samples were chosen by quick probes and are timed
    # in full by their own trials, near the budget.
    labels = [t.user_attrs.get("recipe") or t.user_attrs.get("start") for t in trials]
    uniform = next(
        i for i, label in enumerate(labels) if label.startswith("uniform") and label.endswith("l1 at the budget")
    )
    global_ = next(
        i for i, label in enumerate(labels) if label.startswith("global") and label.endswith("l2 at the budget")
    )
    assert max(uniform, global_) < labels.index("near the budget"), labels
    chosen = [t for t in trials if t.user_attrs.get("recipe", "").endswith("at the budget")]
    for t in chosen:
        later = t.user_attrs["recipe"].startswith("latency-aware")  # found once the first trial had run
        where = "the set-up after the first trial" if later else "study creation"
        assert t.user_attrs["latency"]["measured_at"] == where
        assert t.values[1] <= budget and t.user_attrs["fine_tuned"]
    starts = [t for t in trials if t.user_attrs.get("start")]
    assert starts and all("measured_at" not in t.user_attrs["latency"] for t in starts), "timed by their trials"
    assert all(0.8 * 0.85 * budget <= t.values[1] <= 1.15 * budget for t in starts), [t.values[1] for t in starts]

    stored = len(optuna.load_study(study_name=config.study_name, storage=config.storage_url).trials)
    with pytest.raises(UsageError, match="different --budget-ms/--budget-fraction"):
        run_search(replace(config, budget_fraction=0.4, trials=10, study=config.study_name))
    after = optuna.load_study(study_name=config.study_name, storage=config.storage_url).trials
    assert len(after) == stored, "study left intact"


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trial_module.prune_copy

    def flaky(baseline, policy, *args, **kwargs):
        if policy.stages["layer1"].stream == 0.35:
            raise RuntimeError("simulated crash in channel pruning")
        return real(baseline, policy, *args, **kwargs)

    monkeypatch.setattr(trial_module, "prune_copy", flaky)
    reporter = RecordingReporter()
    study = run_search(replace(config, trials=5, precisions=("fp32",)), reporter).study
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1
    assert failed[0].user_attrs["error"] == "RuntimeError: simulated crash in channel pruning"
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4
    assert any("simulated crash" in w for w in reporter.warnings)


@pytest.mark.slow
def test_ctrl_c_leaves_a_study_that_resumes_the_interrupted_policy(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trial_module.train
    calls = {"n": 0}

    def interrupted_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, "train", interrupted_once)
    config = replace(config, trials=3, precisions=("fp32",))  # fewer than the recipes still queued behind it
    first = run_search(config)
    assert first.interrupted
    stopped = next(t for t in first.study.trials if t.user_attrs.get("interrupted"))
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert stopped.user_attrs["interrupted"] is True
    assert stopped.user_attrs["recipe"] == "uniform 0.35 l1"

    second = run_search(config)
    assert not second.interrupted
    done = second.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3
    assert [t.user_attrs.get("recipe") for t in done].count("uniform 0.35 l1") == 1, "retried after resume, first"
    retry = next(t for t in done if t.user_attrs.get("recipe") == "uniform 0.35 l1")
    shown = run_main("show", "--study", "tiny", "--studies-dir", config.studies_dir, "--trial", str(stopped.number))
    assert f"was interrupted (Ctrl-C) and retried as trial {retry.number}" in shown.stderr, shown.stderr


@pytest.mark.slow
def test_budget_below_the_fastest_policy_is_refused_before_any_study_exists(config: SearchConfig) -> None:
    with pytest.raises(UsageError, match="below the fastest policy") as err:
        run_search(replace(config, budget_ms=0.001))
    assert "ms" in str(err.value)
    assert not Path(config.storage_url.removeprefix("sqlite:///")).exists(), "no study database is left behind"


@pytest.mark.slow
def test_a_baseline_near_chance_is_warned_about_and_the_trained_one_is_not(
    config: SearchConfig, tmp_path: Path
) -> None:
    import torch

    from search.models.build import build_model

    untrained = tmp_path / "untrained.pth"
    torch.manual_seed(1)
    torch.save(build_model("resnet18", 10).state_dict(), untrained)  # weights that never saw these digits
    quick = replace(config, trials=1, precisions=("fp32",))
    reporter = RecordingReporter()
    run_search(replace(quick, weights=str(untrained), study="chance"), reporter)
    near = [w for w in reporter.warnings if "near chance" in w]
    assert len(near) == 1 and "classes in this order (0, 1, 2, 3, 4, 5, ...)" in near[0]
    reporter = RecordingReporter()
    run_search(replace(quick, study="trained"), reporter)
    assert not [w for w in reporter.warnings if "near chance" in w]


def test_an_unknown_model_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    config = SearchConfig(budget_ms=30, model="resnet9000", data=DataSpec(f"imagefolder:{tmp_path / 'absent'}"))
    with pytest.raises(UsageError, match="unknown model 'resnet9000'"):
        run_search(config)


@pytest.mark.slow
def test_recipes_left_queued_when_trials_run_out_are_reported(config: SearchConfig) -> None:
    reporter = RecordingReporter()
    result = run_search(replace(config, trials=2, precisions=("fp32",), study="short"), reporter)
    waiting = result.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 2, "four recipes were enqueued, two trials ran"
    assert any(line.startswith("2 enqueued policies were not run") for line in reporter.infos), reporter.infos


@pytest.mark.slow
def test_a_refused_first_run_leaves_no_empty_database_behind(config: SearchConfig) -> None:
    refused = replace(config, budget_ms=1e-6, precisions=("fp32",), study="refused")
    with pytest.raises(UsageError, match="below the fastest policy"):
        run_search(refused)
    assert not Path(refused.storage_url.removeprefix("sqlite:///")).exists()


class _Killed(BaseException):
    """What ``kill -9`` does to a worker mid-trial: it stops, and nothing is told to the study."""


@pytest.mark.slow
def test_a_trial_killed_mid_fine_tune_is_retried_in_its_place_and_the_study_ends_at_trials(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trial_module.train
    calls = {"n": 0}

    def killed_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # trial 2, "uniform 0.35 l1": its latency and constraint are recorded, then it dies
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, "train", killed_once)
    config = replace(config, trials=3, precisions=("fp32",), heartbeat_seconds=1)
    with pytest.raises(_Killed):
        run_search(config)
    killed = next(t for t in optuna.load_study(study_name="tiny", storage=config.storage_url).trials if t.number == 2)
    assert killed.state == optuna.trial.TrialState.RUNNING and "latency" in killed.user_attrs
    time.sleep(2.5)  # past the grace period of two heartbeats: its worker is gone

    reporter = RecordingReporter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = run_search(config, reporter).study
    assert any("(2 trials so far)" in line for line in reporter.infos), reporter.infos
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 2)
    assert retry.params == killed.params and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["recipe"] == "uniform 0.35 l1"
    started = [t for t in study.trials if t.datetime_start and t.datetime_start > killed.datetime_start]
    assert min(started, key=lambda t: t.datetime_start).number == retry.number, "the retry runs first, in its place"
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3, [(t.number, t.state.name, t.user_attrs.get("recipe")) for t in study.trials]
    assert reporter.steps["trials"] == 3
    assert not [w for w in caught if "constraint" in str(w.message)], [str(w.message) for w in caught]
    assert retry.constraints["latency_over_budget_ms"] == pytest.approx(retry.user_attrs["budget_violation_ms"])

    shown = run_main("show", "--study", "tiny", "--studies-dir", config.studies_dir, "--trial", "2")
    assert shown.returncode == 2
    assert f"trial 2 was killed (no heartbeat) and retried as trial {retry.number}" in shown.stderr, shown.stderr


def test_a_failed_heartbeat_write_does_not_silence_the_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's heartbeat thread ends at its first exception; a database blip must not make a running trial stale."""
    import threading

    from optuna.storages import RDBStorage
    from optuna.storages._heartbeat import HeartbeatThread

    from search.study.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_seconds=1)
    study = optuna.create_study(study_name="beat", storage=storage)
    trial = study.ask()
    real = RDBStorage.record_heartbeat
    beats: list[str] = []

    def flaky(self: RDBStorage, trial_id: int) -> None:
        if not beats:
            beats.append("failed")
            raise RuntimeError("database unreachable for a moment")
        beats.append("beat")
        real(self, trial_id)

    monkeypatch.setattr(RDBStorage, "record_heartbeat", flaky)
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    thread = HeartbeatThread(trial._trial_id, storage)
    thread.start()
    time.sleep(3.5)  # the failed beat, its retry 1 s later, and at least one beat after (interval 1 s)
    thread.join()
    assert not errors, errors
    assert beats[0] == "failed" and beats.count("beat") >= 2, beats
    assert beats[1] == "beat", "the failed beat is retried at once, not an interval later"
    assert storage._get_stale_trial_ids(study._study_id) == [], "the trial is not stale"
