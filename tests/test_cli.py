"""The CLI end to end on a tiny setting, and every bad input as a one-line error with exit status 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import torch

from tests.conftest import run_cli, run_main


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory, trained_weights: Path) -> dict[str, str]:
    """A finished tiny study made through the CLI, which the bad-input tests must leave intact."""
    studies = tmp_path_factory.mktemp("cli") / "studies"
    common = [  # FP32 only: INT8 in a search is tested in test_quantize.py
        "--precision",
        "fp32",
        "--weights",
        str(trained_weights),
        "--input-size",
        "32",
        "--studies-dir",
        str(studies),
        "--study",
        "cli-tiny",
        "--finetune-steps",
        "3",
        "--bn-batches",
        "2",
    ]
    first = run_cli("search", "--budget-ms", "1000", "--trials", "5", *common)
    return {
        "studies": str(studies),
        "first_out": first.stdout,
        "first_err": first.stderr,
        "first_code": str(first.returncode),
        "common": "\x00".join(common),
    }


def _trials(tiny: dict[str, str]) -> int:
    url = f"sqlite:///{tiny['studies']}/cli-tiny.db"
    return len(optuna.load_study(study_name="cli-tiny", storage=url).trials)


@pytest.mark.slow
def test_search_end_to_end_prints_front_plot_and_dashboard_command(tiny_study: dict[str, str]) -> None:
    out = tiny_study["first_out"]
    assert tiny_study["first_code"] == "0", tiny_study["first_err"]
    assert "Baseline latency:" in out and "Created study 'cli-tiny'" in out
    assert "Pareto front of study 'cli-tiny'" in out
    assert "Recommended: trial" in out
    assert f"optuna-dashboard sqlite:///{tiny_study['studies']}/cli-tiny.db" in out
    assert "Setup: measure the baseline's latency, " in out, "each creation phase says its seconds"
    # The default rung, 10x the 3 steps of rung 0, is cut to one epoch of digits' 1,259 training images at batch 64.
    assert "rung 0 at 3 steps, rung 1 at 20;" in " ".join(out.split())
    summary = out.split("Pareto front of study")[1]
    assert "Set-up before the first trial: " in summary and "measure the baseline's latency" in summary
    assert (Path(tiny_study["studies"]) / "cli-tiny" / "pareto.png").stat().st_size > 10_000
    assert "already meets the budget" in tiny_study["first_err"] + out  # 1000 ms: the unpruned model fits
    assert _trials(tiny_study) == 5


@pytest.mark.slow
def test_rerun_resumes_and_pareto_command_reads_the_study(tiny_study: dict[str, str]) -> None:
    common = tiny_study["common"].split("\x00")
    again = run_cli("search", "--budget-ms", "1000", "--trials", "6", *common)
    assert again.returncode == 0, again.stderr
    assert "Resuming study 'cli-tiny' (5 trials so far)" in again.stdout
    assert _trials(tiny_study) == 6
    shown = run_main("pareto", "--study", "cli-tiny", "--studies-dir", tiny_study["studies"], "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert '"recommended"' in shown.stdout and '"front"' in shown.stdout


def _bad(tiny: dict[str, str], *override: str, separate_process: bool = False) -> subprocess.CompletedProcess[str]:
    """Run search against the tiny study with some options replaced, and check the study is intact."""
    before = _trials(tiny)
    args = dict(zip(tiny["common"].split("\x00")[::2], tiny["common"].split("\x00")[1::2], strict=True))
    args.update(dict(zip(override[::2], override[1::2], strict=True)))
    args.setdefault("--budget-ms", "1000")
    flat = [item for pair in args.items() for item in pair if item != ""]
    result = (run_cli if separate_process else run_main)("search", "--trials", "50", *flat)
    assert _trials(tiny) == before, "a bad input must not change the study"
    return result


@pytest.mark.slow
def test_bad_data_inputs(tiny_study: dict[str, str], tmp_path: Path) -> None:
    assert_usage_error(_bad(tiny_study, "--data", f"imagefolder:{tmp_path / 'nope'}"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(_bad(tiny_study, "--data", f"imagefolder:{empty}"), str(empty))
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.jpg").write_bytes(b"not an image")
    assert_usage_error(_bad(tiny_study, "--data", f"imagefolder:{broken}"), "could be decoded")
    assert_usage_error(_bad(tiny_study, "--data", "mnist"), "mnist")
    assert_usage_error(_bad(tiny_study, "--mean", "0.5,0.5,0.5"), "different --mean", "now 0.5,0.5,0.5")
    for option, value, why in (("--mean", "inf,0,0", "finite"), ("--std", "0.2,0,0.2", "above 0")):
        result = _bad(tiny_study, option, value)  # a NaN loss, or a division by zero, once training began
        assert result.returncode == 2 and option in result.stderr and why in result.stderr, result.stderr
    assert_usage_error(_bad(tiny_study, "--input-size", "40"), "different --input-size (32, now 40)")


@pytest.mark.slow
def test_bad_model_and_weights(tiny_study: dict[str, str], tmp_path: Path) -> None:
    assert_usage_error(_bad(tiny_study, "--model", "resnet19", separate_process=True), "resnet19")
    assert_usage_error(_bad(tiny_study, "--model", "resnet34", "--study", "other"), "layer", "[")
    from search.models.build import build_model

    three = tmp_path / "three_classes.pth"
    torch.save(build_model("resnet18", 3).state_dict(), three)
    assert_usage_error(_bad(tiny_study, "--weights", str(three)), "3", "10 classes")
    assert_usage_error(_bad(tiny_study, "--weights", str(tmp_path / "missing.pth")), "missing.pth")


@pytest.mark.slow
def test_bad_budget_and_storage(tiny_study: dict[str, str]) -> None:
    for budget in ("0", "-5", "fast"):
        result = _bad(tiny_study, "--budget-ms", budget, separate_process=budget == "0")
        assert result.returncode == 2 and "--budget-ms" in result.stderr and "Traceback" not in result.stderr
    for fraction in ("0", "1.5"):
        result = _bad(tiny_study, "--budget-fraction", fraction)
        assert result.returncode == 2 and "--budget-fraction" in result.stderr and "(0, 1]" in result.stderr
    both = _bad(tiny_study, "--budget-fraction", "0.5")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert_usage_error(
        _bad(tiny_study, "--budget-ms", "0.0001", "--study", "too-fast"), "below the fastest policy", "ms"
    )
    assert_usage_error(_bad(tiny_study, "--storage", "notaurl"), "SQLAlchemy URL")
    assert_usage_error(_bad(tiny_study, "--storage", "postgresql+nodriver://x@localhost/db"), "storage")
    assert_usage_error(_bad(tiny_study, "--budget-ms", "900"), "different --budget-ms")
    assert_usage_error(_bad(tiny_study, "--sampler", "gp"), "different --sampler ('tpe', now 'gp')")
    unknown = _bad(tiny_study, "--sampler", "cmaes")
    assert unknown.returncode == 2 and "--sampler" in unknown.stderr and "Traceback" not in unknown.stderr


def test_a_storage_password_never_appears_in_a_message(tmp_path: Path) -> None:
    from search.study.config import SearchConfig
    from search.study.storage import masked

    url = "postgresql+psycopg2://prune:s3cret-pw@127.0.0.1:9/prune"
    assert masked(url) == "postgresql+psycopg2://prune:***@127.0.0.1:9/prune"
    assert SearchConfig(budget_ms=1.0, storage=url).to_dict()["storage"] == masked(url), "nor on the study"
    for args in (
        ["search", "--budget-ms", "30", "--study", "x", "--storage", url],
        ["pareto", "--study", "x", "--storage", url],
        ["search", "--budget-ms", "30", "--study", "x", "--storage", "nonsense://prune:s3cret-pw@host/db"],
    ):
        result = run_main(*args)
        assert_usage_error(result, "***")
        assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_password_given_as_a_query_parameter_is_masked_too() -> None:
    from search.study.config import SearchConfig
    from search.study.urls import masked_command

    url = "postgresql+psycopg2://prune@127.0.0.1:9/prune?sslmode=disable&password=s3cret-pw"
    show = ["show", "--trial", "0", "--study", "x", f"--storage={url}"]
    for args in (["pareto", "--study", "x", "--storage", url], show):
        result = run_main(*args)
        assert_usage_error(result, "password=***")
        assert "s3cret-pw" not in result.stdout + result.stderr
    assert "s3cret-pw" not in json.dumps(SearchConfig(budget_ms=1.0, storage=url).to_dict()), "nor on the study"
    recorded = masked_command(["export", "--storage", url, f"--storage={url}", "--target", "http://u:s3cret-pw@h/"])
    assert "s3cret-pw" not in " ".join(recorded) and recorded[0] == "export" and recorded[1] == "--storage"


def test_the_dashboard_refuses_a_taken_or_impossible_port_in_one_line(tiny_study: dict[str, str]) -> None:
    import socket

    study = ["--studies-dir", tiny_study["studies"], "--study", "cli-tiny"]
    assert_usage_error(run_main("dashboard", *study, "--port", "70000"), "--port must be 1..65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert_usage_error(run_main("dashboard", *study, "--port", port), f"127.0.0.1:{port} is in use")


def test_export_refuses_a_taken_folder_of_its_second_trial_before_training_the_first(
    tiny_study: dict[str, str], tmp_path: Path
) -> None:
    study = optuna.load_study(study_name="cli-tiny", storage=f"sqlite:///{tiny_study['studies']}/cli-tiny.db")
    first, second = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE][:2]
    (tmp_path / f"trial-{second}").mkdir(parents=True)
    (tmp_path / f"trial-{second}" / "notes.txt").write_text("mine")
    where = ["--study", "cli-tiny", "--studies-dir", tiny_study["studies"], "--out", str(tmp_path)]
    result = run_main("export", *where, "--trial", str(first), "--trial", str(second))
    assert_usage_error(result, f"trial-{second} exists and is not an export")
    assert not (tmp_path / f"trial-{first}").exists() and not list(tmp_path.glob(".trial-*")), "nothing trained"


def test_a_study_this_tool_did_not_make_is_named_so_by_pareto_show_and_export(tmp_path: Path) -> None:
    optuna.create_study(study_name="plain", storage=f"sqlite:///{tmp_path}/plain.db", directions=["maximize"])
    where = ["--study", "plain", "--studies-dir", str(tmp_path)]
    for command in (["pareto"], ["show", "--trial", "0"], ["export", "--trial", "0"]):
        assert_usage_error(run_main(*command, *where), "'plain'", "was not made by this tool's search")
    for name in ("x?y#z", "../up", ".hidden"):  # its database would be another file than the name says
        result = run_main("search", "--budget-ms", "30", "--study", name, "--studies-dir", str(tmp_path))
        assert result.returncode == 2 and "cannot name a study" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.db"], "nothing written for them"
    import sqlite3

    with sqlite3.connect(tmp_path / "mine.db") as db:  # a user's own database, not a study's
        db.execute("CREATE TABLE notes (text)")
    assert_usage_error(run_main("pareto", "--study", "mine", "--studies-dir", str(tmp_path)), "not an Optuna study")
    with sqlite3.connect(tmp_path / "mine.db") as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)], "Optuna added no tables"


def test_a_postgresql_password_is_handed_to_a_child_through_pgpassword_only() -> None:
    from search.study.urls import password_in_env

    assert password_in_env("postgresql+psycopg2://u:s3cr%40t@h:5432/db") == (
        "postgresql+psycopg2://u@h:5432/db",
        {"PGPASSWORD": "s3cr@t"},
    )
    assert password_in_env("postgresql://u@h/db?password=pw&sslmode=require") == (
        "postgresql://u@h/db?sslmode=require",
        {"PGPASSWORD": "pw"},
    )
    assert password_in_env("postgresql://u@h/db?sslpassword=pw")[1] == {}, "no variable takes that one"
    assert password_in_env("sqlite:///a.db") == ("sqlite:///a.db", {})


def test_a_password_with_an_unencoded_at_sign_is_masked_whole() -> None:
    """Parsers split ``//u:s3cret@pw@host`` at its first '@': 'pw@host' reached the message as the host."""
    from search.study.urls import masked, password_in_env, without_password, without_secrets

    url = "postgresql+psycopg2://prune:s3cret@pw@127.0.0.1:9/prune"
    assert masked(url) == "postgresql+psycopg2://prune:***@127.0.0.1:9/prune"
    assert without_secrets(url) == "postgresql+psycopg2://prune@127.0.0.1:9/prune"
    assert password_in_env(url)[1] == {"PGPASSWORD": "s3cret@pw"}
    said = without_password('could not translate host name "pw@127.0.0.1" to address', url)
    assert "s3cret" not in said and "pw@" not in said and "address" in said, said
    result = run_main("pareto", "--study", "x", "--storage", url)
    assert result.returncode == 2 and "s3cret" not in result.stderr and "pw@" not in result.stderr, result.stderr


def test_postgresql_without_a_driver_opens_with_the_installed_psycopg2() -> None:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg (3); the postgres extra installs psycopg2."""
    result = run_main("pareto", "--study", "x", "--storage", "postgresql://prune:pw@127.0.0.1:9/prune")
    assert_usage_error(result, "127.0.0.1")
    assert "psycopg2.OperationalError" in result.stderr and "Connection refused" in result.stderr
    assert "Failed to import" not in result.stderr and "install" not in result.stderr


@pytest.mark.slow
def test_pareto_that_cannot_write_its_plot_still_answers_and_says_so(tiny_study: dict[str, str]) -> None:
    result = run_main("pareto", "--study", "cli-tiny", "--studies-dir", tiny_study["studies"], "--plot",
                      "/proc/nodir/p.png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Pareto front of study 'cli-tiny'" in result.stdout and "Recommended: trial" in result.stdout
    assert "The plot could not be written to /proc/nodir/p.png" in result.stdout
    assert "Export the recommended model:" in result.stdout and "Traceback" not in result.stderr


def test_pareto_writes_its_plot_where_it_says(tiny_study: dict[str, str], tmp_path: Path) -> None:
    where = ["pareto", "--study", "cli-tiny", "--studies-dir", tiny_study["studies"], "--plot"]
    for given, written in ((tmp_path, tmp_path / "pareto.png"), (tmp_path / "front", tmp_path / "front.png")):
        result = run_main(*where, str(given))
        assert result.returncode == 0 and f"Plot: {written}" in result.stdout and written.is_file(), result.stdout


@pytest.mark.slow
def test_show_of_a_retried_trial_names_the_trial_it_retried(tiny_study: dict[str, str], tmp_path: Path) -> None:
    shutil.copy(Path(tiny_study["studies"]) / "cli-tiny.db", tmp_path / "cli-tiny.db")
    url = f"sqlite:///{tmp_path}/cli-tiny.db"
    study = optuna.load_study(study_name="cli-tiny", storage=url)
    first = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.number > 0)
    for attrs, system in (({"retry_of": first.number}, {}), ({}, {"failed_trial": 0, "retry_history": [0]})):
        study.add_trial(  # as a Ctrl-C (user attribute) or a silent worker's (system attributes) retry finishes
            optuna.trial.create_trial(
                values=first.values, params=first.params, distributions=first.distributions,
                user_attrs={**first.user_attrs, **attrs}, system_attrs=system,
            )
        )  # fmt: skip
    numbers = [t.number for t in study.trials][-2:]
    for number, retried in zip(numbers, (first.number, 0), strict=True):
        shown = run_main("show", "--trial", str(number), "--study", "cli-tiny", "--storage", url)
        assert shown.returncode == 0, shown.stderr
        assert re.search(rf"retry of\s*│\s*trial {retried} ", shown.stdout), shown.stdout
        as_json = run_main("show", "--trial", str(number), "--study", "cli-tiny", "--storage", url, "--format", "json")
        assert json.loads(as_json.stdout)["retry_of"] == retried
    plain = run_main("show", "--trial", str(first.number), "--study", "cli-tiny", "--storage", url, "--format", "json")
    assert json.loads(plain.stdout)["retry_of"] is None


@pytest.mark.slow
def test_search_ends_with_the_export_command_for_its_study(tiny_study: dict[str, str]) -> None:
    line = next(x for x in tiny_study["first_out"].splitlines() if x.startswith("Export the recommended model:"))
    assert f"python cli.py export --study cli-tiny --best --studies-dir {tiny_study['studies']}" in line


@pytest.mark.slow
def test_the_front_table_says_what_its_star_means(tiny_study: dict[str, str]) -> None:
    out = tiny_study["first_out"]
    assert "* the recommended trial: the most accurate within the budget" in out
    assert any(line.strip().startswith("│") and "*" in line for line in out.splitlines()), "a row is starred"


@pytest.mark.slow
def test_paths_that_cannot_be_written_are_one_line_errors(tiny_study: dict[str, str], tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    studies = ["--study", "cli-tiny", "--studies-dir", tiny_study["studies"]]
    for args in (
        ["search", "--budget-ms", "30", "--studies-dir", "/proc/studies"],
        ["search", "--budget-ms", "30", "--studies-dir", f"{afile}/studies"],
        ["search", "--budget-ms", "30", "--storage", "sqlite:////proc/nodir/x.db"],
        ["export", *studies, "--best", "--epochs", "0", "--out", "/proc/nodir/out"],
    ):
        assert_usage_error(run_main(*args))


def test_a_studies_dir_that_is_a_file_is_named_so(tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    for args in (
        ["search", "--budget-ms", "30", "--studies-dir", str(afile)],
        ["search", "--budget-ms", "30", "--studies-dir", f"{afile}/studies"],
        ["pareto", "--study", "x", "--studies-dir", str(afile)],
        ["show", "--trial", "0", "--study", "x", "--studies-dir", str(afile)],
    ):
        assert_usage_error(run_main(*args), f"{afile} is a file, not a folder")
    assert afile.read_text() == "not a folder"


def test_a_refused_search_leaves_no_database_or_empty_folder(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    for args, words in (
        (["--weights", str(tmp_path / "missing.pth")], "does not exist"),
        (["--data", str(tmp_path / "nowhere")], "unknown data source"),
        (["--no-promotion", "--weights", str(tmp_path / "missing.pth")], "does not exist"),
    ):
        assert_usage_error(run_main("search", "--budget-ms", "30", "--studies-dir", str(studies), *args), words)
        assert not studies.exists(), sorted(studies.rglob("*"))


def test_a_study_database_that_fails_mid_run_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy.exc

    from search.cli import main as main_module

    def full(args, console):
        raise sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database or disk is full"))

    monkeypatch.setattr(main_module.COMMANDS["pareto"], "run", full)
    result = run_main("pareto", "--study", "x")
    assert_usage_error(result, "the study's database failed", "database or disk is full", "run the same command")
