"""Multi-worker rules that need no database server: core plans, trial counting, stale trials,
sampling, joining checks, and the single-worker SQLite path with pinning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from search.cli.main import main
from search.errors import UsageError
from search.measuring.hardware import fingerprint
from search.study.coordination import (
    OVER_BUDGET_FACTOR,
    TrialSeededSampler,
    check_same_hardware,
    mark_ready,
    next_step,
    progress,
    use_study_heartbeat,
)
from search.study.creator import is_ready, wait_until_ready
from search.study.retry import failure_reason, retries_first
from search.study.storage import open_storage
from search.study.workers import parse_cpus, plan_cpus, worker_argv
from tests.conftest import ROOT, run_cli, run_main


def test_cpu_lists_and_core_plans() -> None:
    assert parse_cpus("0") == (0,)
    assert parse_cpus("3,0-1") == (0, 1, 3)
    for bad in ("", "a", "2-1", "0,,1"):
        with pytest.raises(ValueError, match="CPU numbers"):
            parse_cpus(bad)
    assert plan_cpus(2, 1, [0, 1]) == [(0,), (1,)]
    assert plan_cpus(2, 2, [0, 1, 2, 3, 4]) == [(0, 1), (2, 3)], "equal shares; a spare core stays idle"
    with pytest.raises(UsageError, match="--workers 3 needs 3 cores"):
        plan_cpus(3, 1, [0, 1])
    with pytest.raises(UsageError, match="--threads 2 needs 2 cores per worker"):
        plan_cpus(2, 2, [0, 1])


def test_worker_command_line_drops_workers_and_pins() -> None:
    argv = ["search", "--workers", "2", "--budget-ms", "5", "--cpus=0-1", "--workers=2", "--trials", "3"]
    assert worker_argv(argv, (1,)) == ["search", "--budget-ms", "5", "--trials", "3", "--cpus", "1"]


def _study(tmp_path: Path, heartbeat: int = 60) -> optuna.Study:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat)
    return optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])


def test_counting_skips_interrupted_and_retried_trials_and_waits_for_running_ones(tmp_path: Path) -> None:
    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(params={"x": 0.1}, distributions=dist, values=[1, 1]))
    study.add_trial(optuna.create_trial(params={"x": 0.2}, distributions=dist, state=TrialState.FAIL))
    study.add_trial(
        optuna.create_trial(
            params={"x": 0.3}, distributions=dist, state=TrialState.FAIL, user_attrs={"interrupted": True}
        )
    )
    study.add_trial(optuna.create_trial(params={"x": 0.4}, distributions=dist, state=TrialState.FAIL))  # went stale
    study.add_trial(
        optuna.create_trial(
            params={"x": 0.4},
            distributions=dist,
            state=TrialState.WAITING,
            system_attrs={"failed_trial": 3, "retry_history": [3]},
        )
    )
    assert progress(study).finished == 2, "the complete trial and the genuine failure"
    assert progress(study).waiting == 1
    running = study.ask()  # pops the retry
    assert running.params == {"x": 0.4}
    assert next_step(study, 3)[0] == "wait", "2 finished + 1 running reach 3: wait, do not overshoot"
    assert next_step(study, 4)[0] == "run"
    study.tell(running, [1, 1])
    assert next_step(study, 3)[0] == "done"


def test_a_retry_still_waiting_runs_even_when_other_workers_filled_the_count(tmp_path: Path) -> None:
    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    for x in (0.1, 0.2):
        study.add_trial(optuna.create_trial(params={"x": x}, distributions=dist, values=[1, 1]))
    study.add_trial(optuna.create_trial(params={"x": 0.3}, distributions=dist, state=TrialState.FAIL))  # went stale
    study.add_trial(
        optuna.create_trial(
            params={"x": 0.3}, distributions=dist, state=TrialState.WAITING, system_attrs={"failed_trial": 2}
        )
    )
    step, now = next_step(study, 2)
    assert (step, now.finished, now.retries_waiting) == ("run", 2, 1), "the killed trial's policy is owed a run"
    study.tell(study.ask(), [1, 1])  # the worker starts the waiting retry first
    assert study.trials[3].state == TrialState.COMPLETE
    assert next_step(study, 2)[0] == "done"


def test_sampled_policies_over_the_budget_do_not_count_but_cannot_run_forever(tmp_path: Path) -> None:
    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}

    def add(x: float, **attrs: object) -> None:
        study.add_trial(optuna.create_trial(params={"x": x}, distributions=dist, values=[0, 1], user_attrs=attrs))

    add(0.0, feasible=False, recipe="unpruned")  # a recipe over the budget still counts
    add(0.1, feasible=False, start="near the budget")
    add(0.2, feasible=True)
    add(0.3, feasible=False)  # sampled and over the budget: cheap, recorded, not counted
    now = progress(study)
    assert (now.finished, now.over_budget) == (3, 1)
    assert next_step(study, 4)[0] == "run"
    for i in range(OVER_BUDGET_FACTOR * 4 - 1):
        add(0.5 + i / 100, feasible=False)
    assert next_step(study, 4)[0] == "done", "the sampler keeps missing the budget: stop rather than loop"


def test_a_trial_whose_worker_went_silent_is_failed_and_retried_once(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat=1)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study._storage.record_heartbeat(trial._trial_id)  # what optimize's heartbeat thread does, then the worker dies
    time.sleep(3.2)  # > grace period of 2 heartbeats
    step, now = next_step(study, 5)
    assert step == "run"
    assert study.trials[0].state == TrialState.FAIL
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == trial.params
    assert retry.system_attrs["failed_trial"] == 0
    assert now.finished == 0 and now.waiting == 1, "a stale, retried trial does not count as finished"
    # The retry going stale too is a genuine failure: no third attempt, and it counts.
    again = study.ask()
    study._storage.record_heartbeat(again._trial_id)
    time.sleep(3.2)
    step, now = next_step(study, 5)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert now.finished == 1


def test_a_killed_trial_is_retried_first_as_it_was_enqueued_without_its_dead_run(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat=1)
    retries_first(study)
    dist = {"x": FloatDistribution(0, 1)}
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x}, user_attrs={"recipe": f"uniform {x}"})
    trial = study.ask(dist)  # uniform 0.1: latency measured, constraint set, then its worker is killed
    trial.set_user_attr("latency", {"corrected_ms": 3.0})
    trial.set_constraint("latency_over_budget_ms", -1.0)
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3.2)  # > grace period of 2 heartbeats
    assert next_step(study, 5)[0] == "run"
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.user_attrs == {"recipe": "uniform 0.1"}, "the retry starts from what was enqueued, not the dead run"
    assert retry.constraints == {}, "its own measurement sets its constraint (no 'constraint value is ignored')"
    popped = study.ask(dist)
    assert popped.number == retry.number and popped.params == {"x": 0.1}, "the retry runs before the queue"
    reason = failure_reason(study.trials, study.trials[0])
    assert reason == f"was killed (no heartbeat) and retried as trial {retry.number}"


def test_sampler_depends_on_seed_and_trial_number_only() -> None:
    def sample(seed: int, number: int) -> float:
        study = optuna.create_study(sampler=TrialSeededSampler(seed, n_startup_trials=10))
        for _ in range(number):
            study.enqueue_trial({"x": 0.5})
            study.ask({"x": FloatDistribution(0, 1)})
        return study.ask({"x": FloatDistribution(0, 1)}).params["x"]

    assert sample(0, 3) == sample(0, 3)
    assert sample(0, 3) != sample(0, 4), "two workers sampling trials 3 and 4 at once get different policies"
    assert sample(0, 3) != sample(1, 3)


@pytest.mark.parametrize("kind", ["tpe", "gp", "random"])
def test_every_sampler_proposes_by_seed_and_trial_number_past_its_start_up_under_the_constraint(kind: str) -> None:
    """Two objectives and the latency-style constraint, as a search has; proposals after the start-up come from the
    sampler's model (TPE, the GP) and depend only on the seed and the trial number."""
    space = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1), "c": CategoricalDistribution(["l1", "l2"])}

    def run(seed: int, trials: int) -> list[dict[str, object]]:
        study = optuna.create_study(
            directions=["maximize", "minimize"], sampler=TrialSeededSampler(seed, n_startup_trials=4, kind=kind)
        )
        for _ in range(trials):
            trial = study.ask(space)
            x, y = trial.params["x"], trial.params["y"]
            latency = 1.0 - 0.5 * x - 0.3 * y
            trial.set_constraint("latency_over_budget_ms", latency - 0.6)
            study.tell(trial, (1.0 - x * y - (0.1 if trial.params["c"] == "l1" else 0.0), latency))
        return [t.params for t in study.trials]

    first = run(0, 7)
    assert first == run(0, 7), "reproducible from the seed"
    assert first[4:] != run(1, 7)[4:], "another seed, other proposals after the start-up"
    assert len({(p["x"], p["y"]) for p in first}) == 7, "no proposal repeats"
    with pytest.raises(ValueError, match="unknown sampler"):
        TrialSeededSampler(0, 4, kind="cmaes")


def test_joining_checks(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    assert not is_ready(study)
    here = fingerprint(1)
    study.set_user_attr("hardware", here)
    mark_ready(study, 7)
    ready, record = wait_until_ready(storage, "s")
    assert ready is not None and ready.study_name == "s" and record is None
    check_same_hardware(study, here, "s")
    elsewhere = dict(here, cpu="Some Other CPU", logical_cpus=64)
    with pytest.raises(
        UsageError, match=r"hardware fingerprint .* cpu: '.*' in the study, 'Some Other CPU' here"
    ) as err:
        check_same_hardware(study, elsewhere, "s")
    assert "logical_cpus" in str(err.value) and "--study NEW" in str(err.value)
    assert use_study_heartbeat(storage, study, None) == 7
    assert (storage.heartbeat_interval, storage.grace_period) == (7, 14), "the study's heartbeat wins"
    with pytest.raises(UsageError, match="heartbeat of 7 s"):
        use_study_heartbeat(storage, study, 60)


def test_workers_flag_needs_a_server_and_enough_cores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["search", "--budget-ms", "5", "--studies-dir", str(tmp_path)]
    assert main([*common, "--workers", "2"]) == 2
    assert "error: --workers 2 needs a database server" in capsys.readouterr().err
    many = len(os.sched_getaffinity(0))
    assert main([*common, "--workers", str(many + 1), "--storage", "postgresql+psycopg2://x@127.0.0.1:9/db"]) == 2
    assert f"--workers {many + 1} needs {many + 1} cores" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--cpus", "zero"])
    assert exit_.value.code == 2 and "CPU numbers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing was started"


@pytest.mark.slow
def test_single_pinned_worker_on_sqlite_and_refusal_of_other_hardware(tmp_path: Path, trained_weights: Path) -> None:
    common = [
        "--budget-ms",
        "1000",
        "--precision",
        "fp32",
        "--weights",
        str(trained_weights),
        "--input-size",
        "32",
        "--finetune-steps",
        "2",
        "--bn-batches",
        "2",
        "--studies-dir",
        str(tmp_path),
        "--study",
        "pinned",
    ]
    first = run_cli("search", *common, "--trials", "4", "--cpus", "0")
    assert first.returncode == 0, first.stderr
    assert "pinned to CPU 0" in first.stdout
    storage = open_storage(f"sqlite:///{tmp_path / 'pinned.db'}")
    study = optuna.load_study(study_name="pinned", storage=storage)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4
    assert all(t.user_attrs["worker"]["cpus"] == [0] for t in done)
    assert study.user_attrs["ready"] is True and study.user_attrs["heartbeat_seconds"] == 60
    assert "baseline_file" not in study.user_attrs, "a SQLite study keeps no copy of the baseline"

    before = len(study.trials)
    study.set_user_attr("hardware", dict(study.user_attrs["hardware"], cpu="Some Other CPU"))
    refused = run_main("search", *common, "--trials", "5")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "hardware fingerprint" in refused.stderr and "Some Other CPU" in refused.stderr
    assert len(optuna.load_study(study_name="pinned", storage=storage).trials) == before, "nothing ran"


_OPENER = """
import pathlib, sys, time
from search.study.storage import open_storage
folder, me, stagger, urls = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:]
for i, url in enumerate(urls):
    (folder / f"ready-{i}-{me}").touch()
    while not (folder / f"go-{i}").exists():
        time.sleep(0.0005)
    time.sleep(int(me) * stagger)
    try:
        open_storage(url).engine.dispose()
        out = "ok"
    except Exception as exc:
        out = f"{type(exc).__name__}: {exc}"
    (folder / f"result-{i}-{me}").write_text(out)
"""


def open_at_once(urls: Sequence[str], folder: Path, processes: int = 4, stagger: float = 0.0) -> list[str]:
    """``processes`` workers open each of ``urls`` (fresh databases) at the same instant, one URL after the
    other; every worker is released by a file only once all of them wait for it, worker N then waits
    N x ``stagger`` seconds (so some start while the first is midway through creating the schema).
    Returns the failures."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, str(folder), str(n), str(stagger), *urls],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n in range(processes)
    ]
    try:
        for i in range(len(urls)):
            deadline = time.monotonic() + 120
            while len(list(folder.glob(f"ready-{i}-*"))) < processes:
                assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a worker died"
                time.sleep(0.01)
            (folder / f"go-{i}").touch()  # all of them are waiting for it: released together
        for child in children:
            assert child.wait(timeout=120) == 0, child.stderr.read().decode() if child.stderr else ""
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    results = [(folder / f"result-{i}-{n}").read_text() for i in range(len(urls)) for n in range(processes)]
    return [r for r in results if r != "ok"]


@pytest.mark.slow
def test_workers_opening_one_fresh_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / f'fresh-{i}.db'}" for i in range(6)]
    failures = open_at_once(urls, tmp_path)
    assert failures == [], failures
    for url in urls:
        assert optuna.get_all_study_summaries(open_storage(url)) == [], "one schema, usable"


def test_every_form_of_the_schema_race_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL reports a table created a moment earlier by another worker as DuplicateTable (a
    ProgrammingError), SQLite as an OperationalError: both are retried, other errors are not."""
    import sqlalchemy.exc

    from search.study import storage as storage_module

    real = storage_module._SteadyHeartbeat  # the RDBStorage it opens
    raised: list[str] = []

    def racing(errors: list[Exception]):
        def make(*args, **kwargs):
            if errors:
                raised.append(str(errors[0]))
                raise errors.pop(0)
            return real(*args, **kwargs)

        return make

    duplicate = sqlalchemy.exc.ProgrammingError(
        "CREATE TABLE studies", {}, Exception('relation "studies" already exists')
    )
    exists = sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
    monkeypatch.setattr(storage_module, "_SteadyHeartbeat", racing([duplicate, exists]))
    assert open_storage(f"sqlite:///{tmp_path / 'a.db'}") is not None
    assert len(raised) == 2, "both forms of the race were retried"
    denied = sqlalchemy.exc.OperationalError("connect", {}, Exception('password authentication failed for "x"'))
    monkeypatch.setattr(storage_module, "_SteadyHeartbeat", racing([denied]))
    with pytest.raises(UsageError, match="password authentication failed"):
        open_storage(f"sqlite:///{tmp_path / 'b.db'}")


def test_a_worker_whose_trial_another_marked_stale_goes_on_without_a_traceback(tmp_path: Path) -> None:
    """Its heartbeat was late (the database away for a moment): another worker failed its trial and queued the
    policy again. Optuna then raised out of optimize ("Cannot tell a FAIL trial"), ending this worker."""
    from search.study.retry import optimize_one

    url = f"sqlite:///{tmp_path}/stale.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])

    def failed_meanwhile(trial: optuna.Trial) -> tuple[float, float]:
        other = optuna.load_study(study_name="s", storage=url)  # the other worker, through the database
        other._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        trial.set_user_attr("accuracy", 0.9)  # what the run records next: refused, the trial is finished
        return 0.9, 1.0

    mine: list = []
    assert optimize_one(study, failed_meanwhile, mine) is False and mine == []
    assert optimize_one(study, lambda trial: (0.8, 2.0), mine) is True and mine[0].values == [0.8, 2.0]


def test_a_baseline_fetched_from_another_machines_study_keeps_the_one_trained_here(
    tmp_path: Path, digits32, trained_weights: Path
) -> None:
    """Joining a PostgreSQL study whose baseline has the same cache name replaced the file a local study was
    made with: that study could no longer be resumed or exported. The local one is now kept and still found."""
    import shutil

    from search.models.build import build_model
    from search.models.checkpoint import file_sha256, save_checkpoint
    from search.training.baseline import baseline_cache_path, kept_baseline_path, prepare_baseline

    cache = tmp_path / "cache"
    path = baseline_cache_path(cache, "resnet18", digits32, 1, 0)
    path.parent.mkdir(parents=True)
    save_checkpoint(path, build_model("resnet18", 10), model_name="resnet18", num_classes=10, meta={"epochs": 1})
    local = file_sha256(path)
    shutil.copy(path, kept_baseline_path(path, local))  # what adopt_baseline does before putting the other in
    shutil.copy(trained_weights, path)  # the other machine's baseline, now in the cache's place
    common = {"cache_dir": cache, "epochs": 1, "seed": 0}
    resumed = prepare_baseline("resnet18", None, digits32, **common, sha256=local)
    assert resumed.sha256 == local and resumed.weights == str(kept_baseline_path(path, local))
    joined = prepare_baseline("resnet18", None, digits32, **common, sha256=file_sha256(path))
    assert joined.weights == str(path), "the study that fetched its baseline uses the cache's file"


def test_a_repeated_policy_copies_the_result_but_not_where_the_first_came_from(tmp_path: Path) -> None:
    from search.progress import NullReporter
    from search.study.trial import _copy_outcome

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/d.db", directions=["maximize", "minimize"])
    first = study.ask()
    attrs = {"recipe": "uniform 0.35 l1", "worker": {"host": "a", "pid": 1}, "accuracy": {"top1": 0.9}}
    for key, value in {**attrs, "budget_violation_ms": -1.0, "feasible": True}.items():
        first.set_user_attr(key, value)
    study.tell(first, [0.9, 3.0])
    again = study.ask()
    again.set_user_attr("worker", {"host": "b", "pid": 2})
    outcome = _copy_outcome(again, study.trials[0], NullReporter())
    got = study.trials[1].user_attrs
    assert outcome.accuracy == 0.9 and got["accuracy"] == {"top1": 0.9} and got["duplicate_of"] == 0
    assert "recipe" not in got and got["worker"] == {"host": "b", "pid": 2}, got


def test_an_abbreviated_workers_option_is_refused_not_passed_on_to_each_worker(tmp_path: Path) -> None:
    from tests.conftest import run_main

    result = run_main("search", "--budget-ms", "30", "--worker", "2", "--studies-dir", str(tmp_path))
    assert result.returncode == 2 and "unrecognized arguments: --worker 2" in result.stderr, result.stderr


def test_the_launcher_stops_its_workers_on_sigterm_as_on_ctrl_c() -> None:
    """`timeout ... search --workers 4`, a kill or a closed terminal reached the launcher alone (the workers run in
    sessions of their own): it died and left them searching. Inside the launch, those signals are Ctrl-C."""
    import signal

    from search.study.workers import interrupt_on_stop_signals

    before = signal.getsignal(signal.SIGTERM)
    restore = interrupt_on_stop_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs between bytecodes: at once
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGHUP) is not None
