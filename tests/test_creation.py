"""A study being created: its creator shows it is alive, waiters wait while it is and take over once it is not,
and a creation stopped half-way is finished by the next run (or discarded and done again), never searched."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from search.data.spec import DataSpec
from search.progress import RecordingReporter
from search.study import create as create_module
from search.study import creator
from search.study import later_setup as later_module
from search.study.config import SearchConfig
from search.study.coordination import mark_ready
from search.study.creator import CreatorHeartbeat, claim, is_ready, read_record, wait_until_ready
from search.study.front import recommended, rows
from search.study.run import run_search
from search.study.storage import open_storage


@pytest.fixture()
def quick_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats every 0.1 s, a creator taken for stopped after 1 s of silence."""
    monkeypatch.setattr(creator, "BEAT_SECONDS", 0.1)
    monkeypatch.setattr(creator, "SILENT_SECONDS", 1.0)


def _new_study(url: str, name: str = "s") -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    storage = open_storage(url)
    return storage, optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])


def check_a_live_creator_is_waited_for_as_long_as_it_works(url: str) -> None:
    """The waiter waits past many silences' worth of time while the heartbeat is fresh, says for whom and for
    what, and gets the study once it is ready (a fixed wait gave up on a live creator after 60 s)."""
    storage, study = _new_study(url)
    record = claim(storage, study, None, "measure each stage pruned alone (latency-aware recipe)")
    assert record is not None
    beat = CreatorHeartbeat(storage, study, record)

    def finish_later() -> None:
        time.sleep(4 * creator.SILENT_SECONDS)
        beat.stop()
        mark_ready(study, 60)

    finisher = threading.Thread(target=finish_later)
    finisher.start()
    reporter = RecordingReporter()
    started = time.monotonic()
    ready, taken = wait_until_ready(storage, "s", reporter, poll=0.05)
    finisher.join()
    assert time.monotonic() - started >= 4 * creator.SILENT_SECONDS
    assert ready is not None and taken is None and is_ready(ready), "joined, not taken over"
    said = [line for line in reporter.infos if line.startswith("Waiting for")]
    assert len(said) == 1, reporter.infos
    assert "process" in said[0] and "latency-aware recipe" in said[0] and "taken for stopped after" in said[0]


def check_a_silent_or_stopped_creator_is_taken_over_by_exactly_one_waiter(url: str) -> None:
    storage, study = _new_study(url)
    # Killed (kill -9) on this host: its last heartbeat is old; the waiter takes over at once.
    old = json.dumps({"host": creator.socket.gethostname(), "pid": 1, "step": "x", "beat": time.time() - 60})
    storage.set_study_user_attr(study._study_id, creator.CREATOR_ATTR, json.loads(old))
    seen = read_record(storage, study._study_id)
    started = time.monotonic()
    ready, taken = wait_until_ready(storage, "s", poll=0.05)
    assert ready is not None and taken is not None and time.monotonic() - started < creator.SILENT_SECONDS
    assert json.loads(taken)["pid"] != 1 and read_record(storage, study._study_id) == taken
    assert claim(storage, study, seen, "b") is None, "a second waiter that saw the dead creator's record loses"

    # On another host (its clock may differ): taken over once its record stays unchanged for the silence.
    storage2, other = _new_study(url, "t")
    far = {"host": "elsewhere", "pid": 2, "step": "y", "beat": time.time() + 3600}
    storage2.set_study_user_attr(other._study_id, creator.CREATOR_ATTR, far)
    started = time.monotonic()
    _, taken = wait_until_ready(storage2, "t", poll=0.05)
    assert taken is not None and creator.SILENT_SECONDS <= time.monotonic() - started < 10 * creator.SILENT_SECONDS

    # Stopped by Ctrl-C: marked on its way out; no wait at all, even with a long silence allowed.
    storage3, third = _new_study(url, "u")
    record = claim(storage3, third, None, "z")
    assert record is not None
    CreatorHeartbeat(storage3, third, record).stopped()
    creator.SILENT_SECONDS = 3600.0
    _, taken = wait_until_ready(storage3, "u", poll=0.05)
    assert taken is not None


def test_a_live_creator_is_waited_for_as_long_as_it_works(tmp_path: Path, quick_beats: None) -> None:
    check_a_live_creator_is_waited_for_as_long_as_it_works(f"sqlite:///{tmp_path / 's.db'}")


def test_a_silent_or_stopped_creator_is_taken_over_by_exactly_one_waiter(tmp_path: Path, quick_beats: None) -> None:
    check_a_silent_or_stopped_creator_is_taken_over_by_exactly_one_waiter(f"sqlite:///{tmp_path / 's.db'}")


def test_a_half_built_study_without_a_creator_record_is_not_ready_however_old(tmp_path: Path) -> None:
    """Made by an older version, stopped after its settings were recorded: no recipes, no trials. Once it
    was taken for ready after two minutes, and searched with nothing enqueued."""
    _, study = _new_study(f"sqlite:///{tmp_path / 's.db'}")
    study.set_user_attr("settings", {"model": "resnet18"})
    study.set_user_attr("created", "2020-01-01T00:00:00+0000")
    assert not is_ready(study)


@pytest.fixture()
def config(tmp_path: Path, trained_weights: Path) -> SearchConfig:
    return SearchConfig(
        budget_ms=None,
        budget_fraction=0.8,  # below the unpruned model: the latency-aware tables are measured
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=32),
        study="c9",
        trials=2,
        finetune_steps=2,
        bn_batches=2,
        precisions=("fp32",),
        studies_dir=str(tmp_path / "studies"),
    )


@pytest.mark.slow
def test_ctrl_c_during_creation_and_after_the_first_trial_is_finished_by_the_reruns(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted during creation (after the baseline was recorded): the rerun takes creation over without
    waiting. Interrupted again once the set-up left for after the first trial had stored its latency-aware tables:
    the next rerun takes that step over, keeps the tables, enqueues the latency-aware recipe and goes on."""
    measured = {"n": 0}
    real_grid = create_module.global_grid
    real_measure, real_paths = later_module.measure_sensitivity, later_module.path_policies

    def stopped_once(module, name, real):
        def stop(*args, **kwargs):
            monkeypatch.setattr(module, name, real)
            raise KeyboardInterrupt

        monkeypatch.setattr(module, name, stop)

    def counted(*args, **kwargs):
        measured["n"] += 1
        return real_measure(*args, **kwargs)

    stopped_once(create_module, "global_grid", real_grid)
    with pytest.raises(KeyboardInterrupt):
        run_search(config)
    half = optuna.load_study(study_name="c9", storage=config.storage_url)
    assert not half.trials and not is_ready(half)

    reporter = RecordingReporter()
    monkeypatch.setattr(later_module, "measure_sensitivity", counted)
    stopped_once(later_module, "path_policies", real_paths)
    result = run_search(config, reporter)
    assert result.interrupted and result.ran == 1
    assert not [line for line in reporter.infos if line.startswith("Waiting for")], "taken over without waiting"
    assert any("was stopped before it finished: this worker takes over" in line for line in reporter.infos)
    assert any(line.startswith("Finishing the creation of study 'c9'") for line in reporter.infos), reporter.infos
    half = optuna.load_study(study_name="c9", storage=config.storage_url)
    assert "latency_aware" in half.user_attrs and is_ready(half)
    assert not any((t.user_attrs.get("recipe") or "").startswith("latency-aware") for t in half.trials)

    reporter = RecordingReporter()
    result = run_search(config, reporter)
    assert any(line.startswith("Finishing the set-up after the first trial: ") for line in reporter.infos)
    assert "Latency-aware tables: kept from before" in reporter.infos
    assert measured["n"] == 1, "the tables measured before Ctrl-C were kept"
    study = result.study
    labels = [t.user_attrs.get("recipe") for t in study.trials]
    assert "unpruned" in labels and any(label and label.startswith("latency-aware") for label in labels), labels
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert recommended(rows(study)) is not None


@pytest.mark.slow
def test_ctrl_c_before_anything_is_recorded_discards_the_study(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while the baseline was timed: nothing of the study is kept, and the rerun creates it anew."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(create_module, "fastest_reachable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(replace(config, trials=1, budget_fraction=None, budget_ms=1e6, study="early"))
    assert not Path(config.storage_url.removeprefix("sqlite:///")).parent.joinpath("early.db").exists()
