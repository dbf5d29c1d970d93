"""Several workers on one study in a real PostgreSQL server (the storage meant for them).

The server comes from ``PRUNE_SEARCH_TEST_POSTGRES`` (``.ci/run`` starts one with
``.ci/postgres.sh``), or, when that is unset, these tests start one themselves with the same
script if PostgreSQL is installed; otherwise they skip, saying so. Each test session gets a
fresh database.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.models.checkpoint import file_sha256
from search.study.coordination import progress
from search.study.storage import open_storage
from tests.conftest import ROOT, run_cli
from tests.test_creation import (  # noqa: F401 (quick_beats is a fixture)
    check_a_live_creator_is_waited_for_as_long_as_it_works,
    check_a_silent_or_stopped_creator_is_taken_over_by_exactly_one_waiter,
    quick_beats,
)
from tests.test_workers import open_at_once

ENV = "PRUNE_SEARCH_TEST_POSTGRES"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server() -> tuple[str, Path]:
    """Start a private server with .ci/postgres.sh (never installing anything); skip if impossible."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip(
            f"no PostgreSQL server: set {ENV}=postgresql+psycopg2://USER@HOST:PORT/DB or install Debian's "
            f'postgresql package (`eval "$(bash .ci/postgres.sh)"` does both)'
        )
    folder = Path(tempfile.mkdtemp(prefix="prune-search-pg-"))
    env = dict(
        os.environ,
        PRUNE_SEARCH_PG_DIR=str(folder),
        PRUNE_SEARCH_PG_PORT=str(_free_port()),
        PRUNE_SEARCH_PG_NO_INSTALL="1",
    )
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "postgres.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"PostgreSQL is installed but no server could be started with .ci/postgres.sh: {reason}")
    return out.stdout.strip().split("=", 1)[1], folder


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A URL of a fresh, empty database on a PostgreSQL server."""
    url = os.environ.get(ENV)
    folder = None
    if not url:
        url, folder = _start_server()
    server = sqlalchemy.make_url(url)
    name = f"prune_search_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if folder is not None:
            env = dict(os.environ, PRUNE_SEARCH_PG_DIR=str(folder), PRUNE_SEARCH_PG_NO_INSTALL="1")
            subprocess.run(
                ["bash", str(ROOT / ".ci" / "postgres.sh"), "stop"], env=env, capture_output=True, timeout=60
            )
            shutil.rmtree(folder, ignore_errors=True)


def _cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # the child keeps its own copy of the descriptor
    try:
        return subprocess.Popen(
            [sys.executable, "cli.py", *args],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        handle.close()


def _tiny(url: str, study: str, studies: Path, *extra: str) -> list[str]:
    return [
        "search",
        "--budget-ms",
        "1000",
        "--input-size",
        "32",
        "--finetune-steps",
        "2",
        "--bn-batches",
        "2",
        "--storage",
        url,
        "--study",
        study,
        "--studies-dir",
        str(studies),
        *extra,
    ]


def _finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> str:
    code = process.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert code == 0, text
    return text


@contextlib.contextmanager
def fresh_databases(postgres_url: str, count: int) -> Iterator[list[str]]:
    """URLs of ``count`` new, empty databases on the test server, dropped afterwards."""
    server = sqlalchemy.make_url(postgres_url)
    names = [f"prune_search_fresh_{uuid.uuid4().hex[:8]}" for _ in range(count)]
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield [server.set(database=name).render_as_string(hide_password=False) for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_workers_opening_one_fresh_database_at_once_all_succeed(postgres_url: str, tmp_path: Path) -> None:
    """Eight workers released together onto a new, empty database, six times, each a fresh database.

    Worker N starts N x 40 ms after the release: PostgreSQL reports the race differently depending on
    whether the first worker has committed the schema yet (DuplicateTable, or a unique violation)."""
    with fresh_databases(postgres_url, 6) as urls:
        failures = open_at_once(urls, tmp_path, processes=8, stagger=0.04)
        assert failures == [], failures
        for url in urls:
            storage = open_storage(url)
            assert optuna.get_all_study_summaries(storage) == [], "one schema, usable"
            storage.engine.dispose()


@pytest.mark.usefixtures("quick_beats")
def test_a_live_creator_is_waited_for_and_a_stopped_one_taken_over(postgres_url: str) -> None:
    with fresh_databases(postgres_url, 2) as (live, stopped):
        check_a_live_creator_is_waited_for_as_long_as_it_works(live)
        check_a_silent_or_stopped_creator_is_taken_over_by_exactly_one_waiter(stopped)


def test_two_workers_on_two_machines_create_and_share_one_study(postgres_url: str, tmp_path: Path) -> None:
    """Two workers started at once, each with its own cache folder (as on two machines), no --weights."""
    machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        _cli(*_tiny(postgres_url, "shared", m, "--trials", "8", "--baseline-epochs", "1", "--cpus", str(i)), log=log)
        for i, (m, log) in enumerate(zip(machines, logs, strict=True))
    ]
    outputs = [_finish(w, log) for w, log in zip(workers, logs, strict=True)]
    assert sum("Created study 'shared'" in out for out in outputs) == 1, "exactly one worker creates the study"

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert 8 <= progress(study).finished <= 9, "the total is met, overshooting by at most one trial per extra worker"
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    policies = [t.user_attrs["policy_key"] for t in trials]
    assert len(set(policies)) == len(policies), "no policy was run twice"
    by_cpu = {tuple(t.user_attrs["worker"]["cpus"]) for t in trials}
    assert by_cpu == {(0,), (1,)}, "both workers ran trials"
    assert [t.user_attrs.get("recipe") for t in trials].count("unpruned") == 1

    # One baseline, the same bytes on both "machines", checked by hash.
    sha = study.user_attrs["settings"]["baseline_sha256"]
    assert study.user_attrs["baseline_file"]["sha256"] == sha
    for machine in machines:  # the loser of the creation race keeps the baseline it trained, named by its hash
        cached = {p: file_sha256(p) for p in (machine / "cache").glob("baseline-*.pt")}
        assert sorted(cached.values()).count(sha) == 1, cached
        assert all(p.stem.endswith(f"-{digest[:12]}") for p, digest in cached.items() if digest != sha), cached


def test_a_worker_killed_mid_trial_is_recovered_by_others(
    postgres_url: str, tmp_path: Path, trained_weights: Path
) -> None:
    common = _tiny(postgres_url, "killed", tmp_path, "--weights", str(trained_weights), "--trials", "6")
    storage = open_storage(postgres_url)
    killed = None
    for attempt in range(3):  # a kill that lands between two trials leaves nothing stale: start another victim
        log = tmp_path / f"victim-{attempt}.log"
        victim = _cli(*common, "--heartbeat", "2", "--cpus", "0", log=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            try:
                study = optuna.load_study(study_name="killed", storage=storage)
            except KeyError:
                time.sleep(0.2)
                continue
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "policy" in t.user_attrs]
            if running and study.user_attrs.get("ready"):
                victim.send_signal(signal.SIGKILL)  # mid-trial: its policy is recorded, its results are not
                victim.wait()
                break
            time.sleep(0.1)
        assert victim.poll() is not None and victim.returncode < 0, log.read_text()
        # The trial left running by the dead worker (read after the kill: the one seen running
        # just before it may have finished in between).
        stale = optuna.load_study(study_name="killed", storage=storage).get_trials(states=(TrialState.RUNNING,))
        if stale:
            killed = stale[0]
            break
    assert killed is not None, "no victim was killed mid-trial in three attempts"

    rescue = run_cli(*common, "--workers", "2", timeout=240)
    assert rescue.returncode == 0, rescue.stdout + rescue.stderr
    assert "each pinned to its own cores" in rescue.stdout
    assert "worker 1: CPU 0" in rescue.stdout and "worker 2: CPU 1" in rescue.stdout
    logs = sorted((tmp_path / "killed" / "workers").glob("worker-*.log"))
    assert [("pinned to CPU" in p.read_text()) for p in logs] == [True, True]

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    assert study.trials[killed.number].state == TrialState.FAIL, "the stale trial was marked failed"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, "its policy was retried once"
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert progress(study).finished in (6, 7), "the killed trial does not count; the study is complete"
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials), "nothing left running"


def test_two_workers_sharing_one_latency_target_never_overlap_on_it(
    postgres_url: str, tmp_path: Path, trained_weights: Path
) -> None:
    from tests.test_target import overlapping, start_loopback_target

    target = start_loopback_target(tmp_path)
    try:
        remote = ["--target", target.url, "--target-token-file", str(target.token_file), "--precision", "fp32"]
        common = _tiny(
            postgres_url, "one-target", tmp_path, "--weights", str(trained_weights), "--trials", "8", *remote
        )
        # Both started at once (as on two machines), so both are up when the study becomes ready:
        # with `--workers 2` the second starts only then, and on a loaded machine the first could
        # finish all eight trials while the second is still importing.
        logs = [tmp_path / f"worker-{cpu}.log" for cpu in (0, 1)]
        workers = [_cli(*common, "--cpus", str(cpu), log=log) for cpu, log in zip((0, 1), logs, strict=True)]
        for w, log in zip(workers, logs, strict=True):
            _finish(w, log, timeout=300)
    finally:
        target.stop()
    study = optuna.load_study(study_name="one-target", storage=postgres_url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert {tuple(t.user_attrs["worker"]["cpus"]) for t in complete} == {(0,), (1,)}, "both workers ran trials"
    assert all(t.user_attrs["latency"]["measured_on"] == target.url for t in complete)
    assert len(target.intervals()) >= 8
    assert not overlapping(target), "the target's own log: one model timed at a time"


def test_a_storage_password_reaches_no_file_artifact_or_message_of_a_search_and_its_export(
    postgres_url: str, tmp_path: Path, trained_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server trusts local connections, so any password opens it: what is checked is where it goes."""
    password = "s3cret-pw-4242"
    url = sqlalchemy.make_url(postgres_url).set(password=password).render_as_string(hide_password=False)
    studies = tmp_path / "studies"
    search = run_cli(*_tiny(url, "secret", studies, "--weights", str(trained_weights), "--trials", "3"))
    assert search.returncode == 0, search.stdout + search.stderr
    assert password not in search.stdout + search.stderr

    # The suggested export command leaves the password out of the URL and takes it from PGPASSWORD: it runs as pasted.
    line = next(x for x in search.stdout.splitlines() if x.startswith("Export the recommended model:"))
    suggested = line.split(":", 1)[1].split()
    assert suggested[:3] == ["PGPASSWORD=...", "python", "cli.py"] and "***" not in line, line
    monkeypatch.setenv("PGPASSWORD", password)
    pasted = run_cli(*suggested[3:], "--epochs", "0", "--test-images", "64", "--out", str(tmp_path / "pasted"))
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    monkeypatch.delenv("PGPASSWORD")

    out = tmp_path / "out"
    exported = run_cli(
        "export", "--study", "secret", "--best", "--epochs", "0", "--test-images", "64", "--out", str(out),
        "--studies-dir", str(studies), "--storage", url,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert password not in exported.stdout + exported.stderr
    card = json.loads(next(out.glob("trial-*/card.json")).read_text())
    assert "--storage" in card["command"] and "***" in card["command"], card["command"]
    written = [p for folder in (out, studies, tmp_path / "pasted") for p in folder.rglob("*") if p.is_file()]
    assert any(p.parent.name == "artifacts" or "artifacts" in p.parts for p in written), "the study's artifacts"
    for path in written:  # the export folder (model, cards), the study's artifacts, the search's files
        assert password.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name="secret", storage=url)
    system = study._storage.get_study_system_attrs(study._study_id)  # the dashboard's artifact records
    stored = [study.user_attrs, system] + [[t.user_attrs, t.system_attrs] for t in study.trials]
    assert password not in json.dumps(stored, default=str), "nor in what the study stores"

    # `dashboard` hands the password to optuna-dashboard through PGPASSWORD, not its command line (ps shows that).
    import argparse
    import io

    from rich.console import Console

    from search.cli import dashboard

    parser = argparse.ArgumentParser()
    dashboard.add_arguments(parser)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where = ["--study", "secret", "--storage", url, "--studies-dir", str(studies)]
    args = parser.parse_args([*where, "--port", str(port)])
    started: dict[str, Any] = {}
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: started.update(argv=argv, env=env))
    dashboard.run(args, Console(file=io.StringIO()))
    assert password not in " ".join(started["argv"]) and started["env"]["PGPASSWORD"] == password


def test_workers_on_postgresql_never_claim_the_same_promotion(postgres_url: str) -> None:
    from search.study.storage import open_storage
    from tests.test_promotion import _CLAIMER

    optuna.create_study(study_name="ties", storage=open_storage(postgres_url), directions=["maximize", "minimize"])
    start = time.time() + 8.0  # all four processes are up by then and race for the same eight claims
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, postgres_url, str(start)], cwd=ROOT, stdout=subprocess.PIPE, env=env
        )
        for _ in range(4)
    ]
    outputs = [w.communicate(timeout=120)[0].decode().split() for w in workers]
    assert all(w.returncode == 0 for w in workers)
    claimed = sorted(int(n) for out in outputs for n in out)
    assert claimed == list(range(8)), f"each promotion claimed exactly once: {outputs}"
