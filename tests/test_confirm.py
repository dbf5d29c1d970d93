"""The front's latencies timed again in fresh processes: picks at the budget's edge are confirmed, or dropped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest

from search.pruning.policy import Policy, StagePolicy
from search.study.confirm import CONFIRM_PREFIX
from search.study.front import pareto_front, recommendation, rows
from tests.conftest import run_main

BASELINE_MS = 12.0
BUDGET_MS = 10.0


def _policy(strength: float) -> dict:
    stages = {name: StagePolicy(stream=strength, inner=strength) for name in ("layer1", "layer2", "layer3", "layer4")}
    return Policy(stages=stages).to_dict()


def _study(path: Path, trials: list[tuple[float, float]], arch: list[str] | None = None) -> optuna.Study:
    """A study stored as a search stores it: (top-1, latency ms) per fine-tuned trial, budget 10 ms of 12."""
    study = optuna.create_study(study_name="edge", storage=f"sqlite:///{path}", directions=["maximize", "minimize"])
    for key, value in {"budget_ms": BUDGET_MS, "baseline_latency_ms": BASELINE_MS, "baseline_accuracy": 0.9}.items():
        study.set_user_attr(key, value)
    for number, (accuracy, ms) in enumerate(trials):
        attrs = {
            "policy": _policy(0.1 + number / 10),
            "latency": {"ratio": ms / BASELINE_MS, "p90_ms": ms * 1.1, "corrected_ms": ms, "median_ms": ms},
            "feasible": ms <= BUDGET_MS,
            "fine_tuned": True,
            "pruning_history": [],
            "accuracy": accuracy,
            "arch_hash": arch[number] if arch else f"arch-{number}",
        }
        study.add_trial(optuna.trial.create_trial(values=[accuracy, ms], user_attrs=attrs, params={}, distributions={}))
    return study


def _timed_again(study: optuna.Study, number: int, ms: list[float], baseline_now: float = BASELINE_MS) -> None:
    ratios = [m / BASELINE_MS for m in ms]
    median = sorted(ratios)[len(ratios) // 2]
    record = {
        "ratios": ratios,
        "ratio": median,
        "corrected_ms": median * BASELINE_MS,
        "searched_ratio": study.trials[number].user_attrs["latency"]["ratio"],
        "baseline_median_ms": [baseline_now] * len(ms),
    }
    study.set_user_attr(f"{CONFIRM_PREFIX}{number}", record)


def test_a_pick_timed_over_the_budget_again_is_dropped_and_one_at_the_edge_is_flagged(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    # The search's one timing put all three within the 10 ms budget; the most accurate sits at its edge.
    study = _study(db, [(0.90, 9.9), (0.85, 9.0), (0.80, 6.0)])
    assert recommendation(rows(study)).pick.number == 0  # type: ignore[union-attr]

    _timed_again(study, 0, [10.1, 10.4, 10.3])  # the winner's curse: over the budget by every repeat
    _timed_again(study, 1, [9.6, 9.8, 10.2])  # within by the median, over in one repeat
    by_number = {r.number: r for r in rows(study)}
    assert not by_number[0].feasible and by_number[0].over_when_timed_again
    assert by_number[0].latency_ms == pytest.approx(10.3) and by_number[0].ratio == pytest.approx(10.3 / 12)
    assert by_number[1].feasible and by_number[1].at_edge and by_number[1].latency_ms == pytest.approx(9.8)
    assert not by_number[2].latency_repeats and by_number[2].latency_ms == 6.0, "never timed again: as searched"
    assert [r.number for r in pareto_front(rows(study))] == [2, 1]

    found = recommendation(rows(study))
    assert found is not None and found.pick.number == 1
    text = "\n".join(found.lines())
    assert "At the budget's edge: trial 1" in text and "0.800-0.850" in text and "budget 0.833" in text
    assert "Over the budget when timed again" in text and "trials 0 (0.858)" in text
    assert found.to_dict()["over_when_timed_again"] == [0] and found.to_dict()["at_budget_edge"]

    out = run_main("pareto", "--study", "edge", "--storage", f"sqlite:///{db}", "--studies-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "Recommended: trial 1" in out.stdout and "the median of 3 more timings" in out.stdout
    assert "9.80 x3" in out.stdout and "edge" in out.stdout
    assert "At the budget's edge" in out.stdout and "Over the budget when timed again" in out.stdout
    shown = run_main("show", "--study", "edge", "--storage", f"sqlite:///{db}", "--trial", "0", "--format", "json")
    assert json.loads(shown.stdout)["timed_again"]["ratios"] == pytest.approx([10.1 / 12, 10.4 / 12, 10.3 / 12])


def test_a_study_never_timed_again_reads_as_before(tmp_path: Path) -> None:
    study = _study(tmp_path / "old.db", [(0.90, 9.9), (0.85, 9.0)])
    found = recommendation(rows(study))
    assert found is not None and found.pick.number == 0 and not found.pick.latency_repeats
    assert not any("timed again" in line or "edge" in line for line in found.lines())


@pytest.mark.slow
def test_the_search_times_its_front_again_in_fresh_processes(tmp_path: Path, trained_weights: Path) -> None:
    studies = tmp_path / "studies"
    common = ["--model", "resnet18", "--weights", str(trained_weights), "--data", "digits", "--input-size", "32"]
    common += ["--finetune-steps", "2", "--bn-batches", "2", "--studies-dir", str(studies), "--study", "again"]
    out = run_main("search", "--budget-fraction", "0.6", "--trials", "4", "--confirm-repeats", "2", *common)
    assert out.returncode == 0, out.stderr
    study = optuna.load_study(study_name="again", storage=f"sqlite:///{studies / 'again.db'}")
    records = {int(k.split(":")[1]): v for k, v in study.user_attrs.items() if k.startswith(CONFIRM_PREFIX)}
    front = pareto_front(rows(study))
    assert front and all(r.number in records for r in front), "every trial on the front within the budget"
    for number, record in records.items():
        assert len(record["ratios"]) == 2 and record["ratio"] > 0
        pids = record["processes"]
        assert len(set(pids)) == 2 and os.getpid() not in pids, "each repeat in a process of its own"
        assert f"Trial {number} timed again in 2 fresh processes" in out.stdout
    best = recommendation(rows(study))
    assert best is not None and best.pick.latency_ms <= study.user_attrs["budget_ms"]
    assert best.pick.latency_ms == pytest.approx(records[best.pick.number]["corrected_ms"])

    # A rerun with nothing left to do times nothing again.
    again = run_main("search", "--budget-fraction", "0.6", "--trials", "4", "--confirm-repeats", "2", *common)
    assert again.returncode == 0, again.stderr
    assert "fresh processes:" not in again.stdout, "no trial timed again"
    assert {k: v for k, v in study.user_attrs.items() if k.startswith(CONFIRM_PREFIX)} == {
        f"{CONFIRM_PREFIX}{n}": r for n, r in records.items()
    }


def test_when_every_candidate_is_over_once_timed_again_the_reports_say_so(tmp_path: Path) -> None:
    db = tmp_path / "over.db"
    study = _study(db, [(0.90, 9.9), (0.85, 11.0)])
    _timed_again(study, 0, [10.2, 10.1, 10.3])
    assert recommendation(rows(study)) is None
    out = run_main("pareto", "--study", "edge", "--storage", f"sqlite:///{db}", "--studies-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "No policy stays within the budget when timed again: trials 0 (0.850 of the baseline)" in out.stdout
    export = run_main("export", "--study", "edge", "--storage", f"sqlite:///{db}", "--best", "--out", str(tmp_path))
    assert export.returncode != 0 and "within its 10 ms budget when timed again" in export.stderr
    assert "Traceback" not in export.stderr


def test_a_bad_repeats_setting_is_one_line_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNE_SEARCH_CONFIRM_REPEATS", "three")
    out = run_main("search", "--budget-ms", "3", "--data", "digits", "--studies-dir", str(tmp_path))
    assert out.returncode == 2 and "PRUNE_SEARCH_CONFIRM_REPEATS='three' must be a whole number" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir()), "nothing made"
    bad = run_main("search", "--budget-ms", "3", "--confirm-repeats", "-1", "--studies-dir", str(tmp_path))
    assert bad.returncode == 2 and "--confirm-repeats" in bad.stderr


class _NoTiming:
    """A meter for studies whose front needs no new timing: any timing fails the test (or, with ``error``, the
    runtime refuses the file as ExecuTorch's lowering or a latency target can)."""

    baseline_ms = BASELINE_MS

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls = 0

    def candidate_onnx(self, model: object, precision: str) -> bytes:
        self.calls += 1
        raise self.error or AssertionError("timed a model that needed no timing")

    @property
    def baseline(self) -> object:
        import torch

        return torch.nn.Identity()

    @property
    def data(self) -> object:
        import types

        import torch

        return types.SimpleNamespace(example_input=lambda: torch.zeros(1, 3, 8, 8))


def test_the_same_model_is_timed_again_once_and_a_refused_timing_keeps_the_search_s(tmp_path: Path) -> None:
    from search.errors import UsageError
    from search.progress import RecordingReporter
    from search.study.confirm import confirm_front

    # the same shape pruned by two criteria: one model to time, two accuracies
    study = _study(tmp_path / "dup.db", [(0.90, 9.9), (0.92, 9.9)], arch=["same", "same"])
    _timed_again(study, 0, [9.5, 9.6, 9.7])
    study.set_user_attr(f"{CONFIRM_PREFIX}0", {**study.user_attrs[f"{CONFIRM_PREFIX}0"], "arch_hash": "same",
                                              "precision": "fp32"})  # fmt: skip
    reporter = RecordingReporter()
    assert confirm_front(study, _NoTiming(), reporter, 3) == 1  # type: ignore[arg-type]
    again = study.user_attrs[f"{CONFIRM_PREFIX}1"]
    assert again["reused_from_trial"] == 0 and again["ratios"] == study.user_attrs[f"{CONFIRM_PREFIX}0"]["ratios"]
    assert "reused from trial 0 (the same model)" in reporter.infos[0]

    other = _study(tmp_path / "refused.db", [(0.90, 9.9), (0.85, 9.0)], arch=["", ""])
    refusing = _NoTiming(UsageError("ExecuTorch cannot lower this model"))
    reporter = RecordingReporter()
    assert confirm_front(other, refusing, reporter, 3) == 0  # type: ignore[arg-type]
    assert refusing.calls == 2, "each front trial tried once, then the loop ends"
    assert all("keeps the search's timing" in w for w in reporter.warnings) and len(reporter.warnings) == 2
    found = recommendation(rows(other))
    assert found is not None and found.pick.number == 0 and not found.pick.latency_repeats


def test_a_trial_over_the_budget_when_timed_again_is_not_promoted(tmp_path: Path) -> None:
    from search.study.rungs import promotable

    study = _study(tmp_path / "promote.db", [(0.90, 9.9), (0.85, 9.0), (0.80, 8.0)])
    before = promotable(study.trials, study.user_attrs, [300], 0.34, fewest=0)
    assert before == [(0, 1)]
    _timed_again(study, 0, [10.1, 10.4, 10.3])
    assert promotable(study.trials, study.user_attrs, [300], 0.5, fewest=0) == [(1, 1)]
    assert promotable(study.trials, study.user_attrs, [300], 0.25) == [(1, 1), (2, 1)], "two left: both go on"


def test_confirm_repeats_0_is_the_one_timing_of_the_search(tmp_path: Path) -> None:
    """``--confirm-repeats 0`` (every other search of this suite runs so, through conftest) times nothing again."""
    from search.progress import RecordingReporter
    from search.study.confirm import confirm_front

    study = _study(tmp_path / "off.db", [(0.90, 9.9), (0.85, 9.0)])
    meter = _NoTiming()
    assert confirm_front(study, meter, RecordingReporter(), 0) == 0  # type: ignore[arg-type]
    assert meter.calls == 0 and not any(k.startswith(CONFIRM_PREFIX) for k in study.user_attrs)
    found = recommendation(rows(study))
    assert found is not None and found.pick.number == 0 and not found.pick.latency_repeats


def test_confirm_repeats_out_of_range_is_refused(tmp_path: Path) -> None:
    out = run_main("search", "--budget-ms", "3", "--confirm-repeats", "21", "--studies-dir", str(tmp_path))
    assert out.returncode == 2 and "a whole number from 0 to 20" in out.stderr


def test_a_machine_whose_state_changed_since_the_study_began_is_named(tmp_path: Path) -> None:
    study = _study(tmp_path / "drift.db", [(0.90, 9.9), (0.85, 9.0)])
    _timed_again(study, 0, [9.5, 9.6, 9.7], baseline_now=12.6)  # 5% slower: within what timing moves
    assert not any("this machine's state changed" in line for line in recommendation(rows(study)).lines())  # type: ignore[union-attr]
    _timed_again(study, 0, [10.4, 10.6, 10.7], baseline_now=15.0)  # 25% slower, and the pick went over with it
    lines = "\n".join(recommendation(rows(study)).lines())  # type: ignore[union-attr]
    assert "The unpruned model timed 25% slower when the front was timed again (15.00 ms)" in lines
    assert "than when the study was created (12.00 ms)" in lines and "trials 0 (0.883)" in lines


def test_the_dashboard_note_keeps_the_rungs_when_the_latency_is_timed_again(tmp_path: Path) -> None:
    """optuna-dashboard keeps one note per trial and each save replaces it: both records must stay in it."""
    from search.study.notes import refresh_note
    from search.study.rungs import rung_key

    study = _study(tmp_path / "s.db", [(0.80, 9.0)])
    trial = study.trials[0]
    study.set_user_attr(rung_key(0), [{"rung": 1, "steps": 300, "accuracy": 0.8312, "images": 5000}])
    refresh_note(study, trial)  # as a promotion does
    _timed_again(study, 0, [9.2, 9.9, 10.3])
    refresh_note(study, trial)  # as the confirmation does

    notes = study._storage.get_study_system_attrs(study._study_id)
    text = "".join(str(v) for k, v in sorted(notes.items()) if "note_str" in k)
    assert "rung 1: top-1 0.8312 on 5000 validation images after 300 fine-tune steps" in text
    assert "latency timed again" in text and "0.825 of the baseline" in text


def test_two_workers_time_each_front_trial_once_and_both_end_with_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on one study claim each trial before timing it again; one whose trials are all claimed waits."""
    import threading
    import time

    import search.study.confirm as confirm_module
    from search.progress import RecordingReporter
    from search.study.confirm import TIMING_CLAIM_PREFIX, confirm_front

    path = tmp_path / "workers.db"
    _study(path, [(0.90, 9.9), (0.85, 9.0), (0.80, 8.0)])
    timed: list[tuple[str, int]] = []

    def slow_timing(meter: object, trial: optuna.trial.FrozenTrial, repeats: int) -> dict:
        timed.append((threading.current_thread().name, trial.number))
        time.sleep(0.6)
        ms = trial.user_attrs["latency"]["corrected_ms"]
        ratios = [ms / BASELINE_MS] * repeats
        return {"ratios": ratios, "ratio": ratios[0], "corrected_ms": ms, "searched_ratio": ratios[0],
                "baseline_median_ms": [BASELINE_MS] * repeats, "processes": [], "fresh_processes": True}  # fmt: skip

    monkeypatch.setattr(confirm_module, "time_again", slow_timing)
    monkeypatch.setattr(confirm_module, "WAIT_SECONDS", 0.1)
    counts: dict[str, int] = {}

    def worker(name: str) -> None:  # each worker opens the study as a process of its own would
        study = optuna.load_study(study_name="edge", storage=f"sqlite:///{path}")
        counts[name] = confirm_front(study, _NoTiming(), RecordingReporter(), 3)  # type: ignore[arg-type]

    threads = [threading.Thread(target=worker, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(n for _, n in timed) == [0, 1, 2], f"each trial timed once in all: {timed}"
    assert sum(counts.values()) == 3 and set(counts) == {"a", "b"}, counts
    assert len({w for w, _ in timed}) == 2, "both workers timed"
    study = optuna.load_study(study_name="edge", storage=f"sqlite:///{path}")
    front = pareto_front(rows(study))
    assert [len(r.latency_repeats) for r in front] == [3, 3, 3]
    claims = {k: v for k, v in study.user_attrs.items() if k.startswith(TIMING_CLAIM_PREFIX)}
    assert sorted(claims) == [f"{TIMING_CLAIM_PREFIX}{n}:3" for n in range(3)]
    assert all(c["done"] for c in claims.values())


def test_a_timing_that_failed_is_tried_again_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure releases the trial's claim: this run goes on without it, a rerun (or another worker) retries."""
    import search.study.confirm as confirm_module
    from search.progress import RecordingReporter
    from search.study.confirm import confirm_front

    study = _study(tmp_path / "retry.db", [(0.90, 9.9)])
    calls: list[int] = []

    def flaky(meter: object, trial: optuna.trial.FrozenTrial, repeats: int) -> dict:
        calls.append(trial.number)
        if len(calls) == 1:
            raise RuntimeError("the timing child crashed")
        return {"ratios": [0.8] * repeats, "ratio": 0.8, "corrected_ms": 9.6, "searched_ratio": 0.825,
                "baseline_median_ms": [BASELINE_MS] * repeats, "processes": [], "fresh_processes": True}  # fmt: skip

    monkeypatch.setattr(confirm_module, "time_again", flaky)
    first = RecordingReporter()
    assert confirm_front(study, _NoTiming(), first, 3) == 0  # type: ignore[arg-type]
    assert "the timing child crashed" in first.warnings[0] and calls == [0]
    again = RecordingReporter()
    assert confirm_front(study, _NoTiming(), again, 3) == 1  # type: ignore[arg-type]
    assert calls == [0, 0] and study.user_attrs[f"{CONFIRM_PREFIX}0"]["ratios"] == [0.8, 0.8, 0.8]
    assert not again.warnings

    # a record of more repeats, written by a worker with a larger --confirm-repeats while this one timed, stays
    other = _study(tmp_path / "race.db", [(0.90, 9.9)])

    def raced(meter: object, trial: optuna.trial.FrozenTrial, repeats: int) -> dict:
        _timed_again(other, 0, [9.1, 9.2, 9.3, 9.4, 9.5])
        return flaky(meter, trial, repeats)

    monkeypatch.setattr(confirm_module, "time_again", raced)
    confirm_front(other, _NoTiming(), RecordingReporter(), 3)  # type: ignore[arg-type]
    assert len(other.user_attrs[f"{CONFIRM_PREFIX}0"]["ratios"]) == 5


def test_a_note_saved_over_by_a_worker_that_missed_a_record_is_saved_again_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promotion saves the note from a read taken before another worker's timing record and note landed."""
    import optuna_dashboard

    from search.study.notes import refresh_note
    from search.study.rungs import rung_key

    study = _study(tmp_path / "race.db", [(0.80, 9.0)])
    trial = study.trials[0]
    study.set_user_attr(rung_key(0), [{"rung": 1, "steps": 300, "accuracy": 0.8312, "images": 5000}])
    real_save = optuna_dashboard.save_note
    saves: list[str] = []

    def save_late(target: optuna.Trial, body: str) -> None:
        if not saves:  # meanwhile the other worker records its timing and saves the whole note
            _timed_again(study, 0, [9.2, 9.9, 10.3])
            real_save(target, body + "\n\n## Trial 0: latency timed again (the other worker's note)")
        saves.append(body)
        real_save(target, body)  # this worker's save, from its earlier read, lands last

    monkeypatch.setattr(optuna_dashboard, "save_note", save_late)
    refresh_note(study, trial)
    note = optuna_dashboard.get_note(optuna.Trial(study, trial._trial_id))
    assert "rung 1: top-1 0.8312" in note and "0.825 of the baseline" in note, note
    assert len(saves) == 2, "saved again once, then the note said every record"
    refresh_note(study, trial)
    assert len(saves) == 2, "a note that already says every record is not saved again"
