"""Promotion: which trials ASHA promotes, that exactly one worker claims each, and how the reports show rungs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from search.cli.search import _config, add_arguments
from search.study.claims import SILENT_SECONDS, claim_key, claim_promotion, read_claim, stale_reason
from search.study.fidelity import LearningView, learned_accuracies, rung_gains
from search.study.front import pick_best, recommendation, rows
from search.study.promotion import promotion_line, promotion_settings
from search.study.rungs import promotable, rung_key, trial_rungs
from search.study.storage import open_storage
from search.study.uncertainty import accuracy_record
from tests.conftest import ROOT, run_main
from tests.test_uncertainty import _flip, _make_study

IMAGES = 500


def _study(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="ties", storage=f"sqlite:///{path}")


def _promoted(study: optuna.Study, number: int, correct: list[bool], steps: int = 60, rung: int = 1) -> None:
    """Record trial ``number`` at ``rung`` as a promotion stores it."""
    record = {"rung": rung, "steps": steps, "accuracy": sum(correct) / len(correct), **accuracy_record(correct)}
    earlier = list(study.user_attrs.get(rung_key(number), []))[: rung - 1]
    study.set_user_attr(rung_key(number), [*earlier, {**record, "seconds": {"finetune": 3.0, "evaluate": 1.0}}])


def test_asha_promotes_the_best_third_of_each_rung_once(tmp_path: Path) -> None:
    base = [i < 400 for i in range(IMAGES)]  # 80%
    # Six fine-tuned trials within the budget (80%..85%), one over it; then one copy of an earlier policy.
    trials = [(0.1 * k, _flip(base, 0, 5 * k), 5.0 + k * 0.1) for k in range(6)] + [(0.9, None, 20.0)]
    _make_study(tmp_path / "ties.db", trials)
    study = _study(tmp_path / "ties.db")
    completed = study.get_trials(deepcopy=False)
    # floor(6 / 3) = 2: the two most accurate (trials 5 and 4) go on to rung 1.
    assert promotable(completed, study.user_attrs, (60,), 1 / 3) == [(5, 1), (4, 1)]
    assert promotable(completed, study.user_attrs, (), 1 / 3) == [], "no rung above 0: no promotion"
    assert promotable(completed, study.user_attrs, (60,), 0.5) == [(5, 1), (4, 1), (3, 1)]

    _promoted(study, 5, _flip(base, 0, 60))
    study = _study(tmp_path / "ties.db")
    completed = study.get_trials(deepcopy=False)
    # Trial 5 reached rung 1 (not promoted again to it); with two rungs, the one trial at rung 1 is too few to
    # promote anything (floor(1 / 3) = 0).
    assert promotable(completed, study.user_attrs, (60, 180), 1 / 3) == [(4, 1)]
    _promoted(study, 4, _flip(base, 0, 20))
    _promoted(study, 3, _flip(base, 0, 10))
    study = _study(tmp_path / "ties.db")
    completed = study.get_trials(deepcopy=False)
    # Rung 1 now holds 3 trials: floor(3 / 3) = 1, but at least two go on, so rung 2 has a comparison: its best
    # two (trials 5 and 4) go on to rung 2, highest rung first. While trials still run there is no minimum.
    assert promotable(completed, study.user_attrs, (60, 180), 1 / 3) == [(5, 2), (4, 2)]
    assert promotable(completed, study.user_attrs, (60, 180), 1 / 3, final=False) == []
    reached = trial_rungs(completed[5], study.user_attrs)
    assert [(r.rung, r.steps, r.images) for r in reached] == [(0, 0, IMAGES), (1, 60, IMAGES)]
    assert reached[1].seconds == 4.0


def test_while_trials_still_run_only_the_best_sixth_so_far_is_promoted_then_the_whole_third(tmp_path: Path) -> None:
    base = [i < 400 for i in range(IMAGES)]  # 80%
    # Twelve fine-tuned trials within the budget, each 1 pp above the one before (80%..91%).
    _make_study(tmp_path / "ties.db", [(0.05 * k, _flip(base, 0, 5 * k), 5.0) for k in range(12)])
    study = _study(tmp_path / "ties.db")
    completed = study.get_trials(deepcopy=False)
    # While trials still run, only floor(12 / 6) = 2 are due, the two best so far; once every trial has finished,
    # the whole top third (floor(12 / 3) = 4).
    assert promotable(completed, study.user_attrs, (60,), 1 / 3, final=False) == [(11, 1), (10, 1)]
    assert promotable(completed, study.user_attrs, (60,), 1 / 3, final=True) == [(11, 1), (10, 1), (9, 1), (8, 1)]
    # Plain asynchronous ASHA would promote each trial that ranked in the top third of those finished before it:
    # here, finishing best-last, that is every trial from the third on (10 of 12). The eager share promotes
    # trials 5 to 11 in turn, 7 of them, never the early ones the later ones beat at once.
    plain: set[int] = set()
    promoted: set[int] = set()
    for finished in range(1, 13):
        seen = completed[:finished]
        plain |= {n for n, _ in promotable(seen, study.user_attrs, (60,), 1 / 3, final=True, fewest=0)}
        promoted |= {n for n, _ in promotable(seen, study.user_attrs, (60,), 1 / 3, final=finished == 12)}
    assert sorted(plain) == list(range(2, 12))
    assert sorted(promoted) == [5, 6, 7, 8, 9, 10, 11]


def test_at_least_two_of_a_rung_go_on_once_the_study_has_finished_so_the_top_rung_has_a_comparison(
    tmp_path: Path,
) -> None:
    base = [i < 400 for i in range(IMAGES)]  # 80%
    # Six fine-tuned trials within the budget (80%..85%), one over it: a quarter of six is one.
    trials = [(0.1 * k, _flip(base, 0, 5 * k), 5.0 + k * 0.1) for k in range(6)] + [(0.9, None, 20.0)]
    _make_study(tmp_path / "ties.db", trials)
    completed = _study(tmp_path / "ties.db").get_trials(deepcopy=False)
    attrs = _study(tmp_path / "ties.db").user_attrs
    assert promotable(completed, attrs, (60,), 1 / 4) == [(5, 1), (4, 1)], "at least two once every trial finished"
    assert promotable(completed, attrs, (60,), 1 / 4, fewest=0) == [(5, 1)], "the fraction alone: one"
    assert promotable(completed, attrs, (60,), 1 / 4, final=False) == [], "no minimum while trials still run"
    assert len(promotable(completed[:1], attrs, (60,), 1 / 4)) == 0, "one trial within the budget: nothing to rank"


def test_the_whole_top_fraction_is_due_only_once_every_trial_of_the_study_has_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.study import promotion as promotion_module

    base = [i < 400 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.1 * k, _flip(base, 0, 5 * k), 5.0) for k in range(6)])
    study = _study(tmp_path / "ties.db")
    assert promotion_module._all_finished(study, 6), "six of six finished"
    assert not promotion_module._all_finished(study, 8), "two trials still to run"
    study.ask()  # a trial running on another worker: its result may yet rank among the promotions
    assert not promotion_module._all_finished(study, 6)
    asked: list[bool] = []
    monkeypatch.setattr(promotion_module, "promote_next", lambda *a, final=False: asked.append(final))
    promotion_module.promote_all(study, None, None, None, 6)  # type: ignore[arg-type]
    promotion_module.promote_all(study, None, None, None, None)  # type: ignore[arg-type]
    assert asked == [False, True]


def test_the_sampler_learns_each_trials_highest_rung_without_favouring_the_longer_fine_tune(tmp_path: Path) -> None:
    base = [i < 400 for i in range(IMAGES)]  # 80%
    # Four trials at rung 0 (81%, 82%, 83%, 84%); the two best were promoted: trial 3 gained 1 pp, trial 2 5 pp.
    _make_study(tmp_path / "ties.db", [(0.1 * k, _flip(base, 0, 5 * (k + 1)), 5.0) for k in range(4)])
    study = _study(tmp_path / "ties.db")
    _promoted(study, 3, _flip(base, 0, 25))
    _promoted(study, 2, _flip(base, 0, 40))
    trials = _study(tmp_path / "ties.db").get_trials(deepcopy=False)
    assert rung_gains(trials, study.user_attrs) == pytest.approx({1: 0.03})
    learned = learned_accuracies(trials, study.user_attrs)
    # Each promoted trial: its rung-1 accuracy less the mean gain. Their mean stays their rung-0 mean (83.5%), and
    # the order is rung 1's: trial 2 first. Trials left at rung 0 keep their values, and the latency is never touched.
    assert learned == pytest.approx({3: 0.85 - 0.03, 2: 0.88 - 0.03})
    view = LearningView(study, learned)
    seen = {t.number: t.values for t in view._get_trials(deepcopy=False, states=None, use_cache=False)}
    assert seen == {0: pytest.approx([0.81, 5.0]), 1: pytest.approx([0.82, 5.0]), 2: [0.85, 5.0], 3: [0.82, 5.0]}
    assert study.trials[2].values == pytest.approx([0.83, 5.0]), "the study's own values are untouched"


def test_tpe_samples_where_the_higher_rung_says_not_where_rung_0_s_noise_did() -> None:
    """Rung 0 ranks policies near x = 0.9 a little higher (noise); the longer fine-tune shows x = 0.1 is better."""
    from optuna.distributions import FloatDistribution

    from search.study.coordination import TrialSeededSampler
    from tests.test_uncertainty import _policy

    def proposals(promoted: bool) -> list[float]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=TrialSeededSampler(0, 4))
        for number in range(16):
            x = 0.05 + 0.06 * number
            attrs = {"policy": _policy(0.1), "fine_tuned": True, "feasible": True, "finetune": {"steps": 30}}
            accuracy = 0.80 + 0.02 * x + (0.001 * (number % 3))
            study.add_trial(
                optuna.trial.create_trial(
                    values=[accuracy, 5.0],
                    params={"x": x},
                    distributions={"x": FloatDistribution(0, 1)},
                    user_attrs=attrs,
                )
            )
            if promoted and number in (0, 1, 14, 15):  # the ends promoted: x near 0.1 gains 6 pp, near 0.9 none
                gain = 0.06 if x < 0.5 else 0.0
                study.set_user_attr(rung_key(number), [{"rung": 1, "steps": 300, "accuracy": accuracy + gain}])
        out = []
        for _ in range(12):
            trial = study.ask()
            out.append(trial.suggest_float("x", 0, 1))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return out

    raw, learned = proposals(False), proposals(True)
    assert sum(learned) / len(learned) < 0.5 < sum(raw) / len(raw), (raw, learned)


_CLAIMER = """
import sys, time
import optuna
from search.study.claims import claim_promotion
from search.study.storage import open_storage
url, start = sys.argv[1], float(sys.argv[2])
storage = open_storage(url)
study = optuna.load_study(study_name="ties", storage=storage)
while time.time() < start:
    time.sleep(0.01)
for number in range(8):
    claim = claim_promotion(storage, study, number, 1)
    if claim is not None:
        print(number, flush=True)
        claim.done()
"""


def test_workers_on_one_sqlite_study_never_claim_the_same_promotion(tmp_path: Path) -> None:
    path = tmp_path / "ties.db"
    _make_study(path, [(0.1, [True] * 10, 5.0)])
    url = f"sqlite:///{path}"
    start = time.time() + 8.0  # all four processes are up by then and race for the same eight claims
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workers = [
        subprocess.Popen([sys.executable, "-c", _CLAIMER, url, str(start)], cwd=ROOT, stdout=subprocess.PIPE, env=env)
        for _ in range(4)
    ]
    outputs = [w.communicate(timeout=120)[0].decode().split() for w in workers]
    assert all(w.returncode == 0 for w in workers)
    claimed = [int(n) for out in outputs for n in out]
    assert sorted(claimed) == list(range(8)), f"each promotion claimed exactly once: {outputs}"


def test_a_claim_whose_worker_is_gone_is_taken_over_by_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "ties.db"
    _make_study(path, [(0.1, [True] * 10, 5.0)])
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.load_study(study_name="ties", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from search.study.claims import _namespace, _started

    gone = {"host": os.uname().nodename, "ns": _namespace(), "pid": dead.pid, "beat": time.time()}
    study.set_user_attr(claim_key(3, 1), gone)  # what kill -9 leaves: a claim neither done nor stopped
    assert "is gone" in (stale_reason(gone) or "")
    assert stale_reason({**gone, "pid": os.getpid()}) is None, "a live worker's claim holds"
    # Another container with the same host name: its pid means nothing here, only its heartbeat does.
    elsewhere = {**gone, "ns": "another boot or pid namespace"}
    assert stale_reason(elsewhere) is None, "a worker in another container is not taken for gone"
    assert "silent" in (stale_reason({**elsewhere, "beat": time.time() - SILENT_SECONDS - 1}) or "")
    assert stale_reason({**gone, "pid": os.getpid(), "started": _started(os.getpid())}) is None
    # A worker restarted in a new container is often the same pid (1) again: its predecessor's claim is not its own.
    reused = stale_reason({**gone, "pid": os.getpid(), "started": "1"}) or ""
    assert "now belongs to another process" in reused
    assert stale_reason({**gone, "pid": os.getpid(), "beat": time.time() - SILENT_SECONDS - 1}) is not None
    first = claim_promotion(storage, study, 3, 1)
    assert first is not None and "is gone" in (first.taken_over or "")
    assert claim_promotion(storage, study, 3, 1) is None, "the new claim's worker (this one) is alive"
    first.stopped()  # Ctrl-C: a rerun takes over at once
    again = claim_promotion(storage, study, 3, 1)
    assert again is not None and "stopped" in (again.taken_over or "")
    again.done()
    assert claim_promotion(storage, study, 3, 1) is None, "a finished promotion is never redone"
    assert json.loads(read_claim(storage, study._study_id, claim_key(3, 1)) or "{}")["done"] is True


def _parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--budget-ms", "5", *flags])


def test_flags_set_the_rungs_or_turn_promotion_off(tmp_path: Path) -> None:
    default = _config(_parse())
    assert (default.finetune_steps, default.finetune_batch) == (30, 64), "the signal benchmark's screen"
    assert default.rung_steps == (300,) and default.promoted_fraction == pytest.approx(1 / 4)
    # The default rung is fitted to the training split: at most one epoch, none where that is rung 0 already.
    assert default.with_default_rungs(45_000).rung_steps == (300,), "CIFAR-10's training split: 300 steps"
    assert default.with_default_rungs(5_000).rung_steps == (79,), "one epoch of 5,000 images at batch 64"
    assert default.with_default_rungs(1_259).rung_steps == (), "digits: 30 steps of 64 already pass its 1,259"
    assert promotion_settings(default.with_default_rungs(1_259)) is None
    assert _config(_parse("--rungs", "500")).with_default_rungs(1_259).rung_steps == (500,), "--rungs as given"
    assert _config(_parse("--finetune-steps", "20")).rung_steps == (200,)
    digits = default.with_default_rungs(1_259)  # what the search says instead of a rung
    assert "Promotion: none: one epoch of the training split is no more than the brief fine-tune's 30 steps of 64" in (
        promotion_line(digits, promotion_settings(digits))
    )
    assert "off (--no-promotion)" in promotion_line(_config(_parse("--no-promotion")), None)
    settings = promotion_settings(default)
    assert settings is not None and settings.folder == Path("studies") / default.study_name / "trial-weights"
    chosen = _config(_parse("--rungs", "100,300", "--promote-fraction", "0.5", "--trial-weights", str(tmp_path)))
    assert chosen.rung_steps == (100, 300) and promotion_settings(chosen).folder == tmp_path  # type: ignore[union-attr]
    off = _config(_parse("--no-promotion"))
    assert off.rung_steps == () and promotion_settings(off) is None, "today's search: no rung above 0, no weights kept"
    common = ["search", "--budget-ms", "5", "--studies-dir", str(tmp_path)]
    refused = run_main(*common, "--rungs", "20", "--finetune-steps", "20")
    assert refused.returncode == 2 and "each rung's total steps must be above --finetune-steps 20" in refused.stderr
    assert run_main(*common, "--rungs", "300,100").returncode == 2
    both = run_main(*common, "--rungs", "100", "--no-promotion")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    unwritable = run_main(*common, "--trial-weights", "/proc/no/weights")
    assert unwritable.returncode == 2 and "pass a writable --trial-weights DIR" in unwritable.stderr, unwritable.stderr
    assert not list(tmp_path.glob("*.db")), "nothing was started"


def test_a_study_made_with_the_third_resumes_with_it_unless_another_fraction_is_given(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from search.errors import UsageError
    from search.study.settings import check_resumable, settings_that_must_match, with_study_fraction

    def settings(config):
        data = SimpleNamespace(input_size=32, mean=[0.5], std=[0.5], content_sha256="h", fingerprint="f")
        data.split = lambda name: range(5000)
        return settings_that_must_match(config, data, SimpleNamespace(text="space"), SimpleNamespace(sha256="abc"))

    weights = ("--trial-weights", str(tmp_path))
    old = with_study_fraction(_config(_parse("--promote-fraction", "0.333333", *weights)), None)
    study = SimpleNamespace(user_attrs={"settings": settings(old)})
    resumed = with_study_fraction(_config(_parse(*weights)), study)  # no flag: the study's own third
    assert resumed.promoted_fraction == pytest.approx(0.333333)
    check_resumable(study, settings(resumed), resumed)
    assert promotion_settings(resumed).fraction == pytest.approx(0.333333)  # type: ignore[union-attr]
    new = with_study_fraction(_config(_parse(*weights)), None)  # a new study: the quarter
    assert new.promoted_fraction == pytest.approx(1 / 4) and settings(new)["promote_fraction"] == 0.25
    told = with_study_fraction(_config(_parse("--promote-fraction", "0.25", *weights)), study)
    with pytest.raises(UsageError, match=r"different --promote-fraction \(0\.333333, now 0\.25\)"):
        check_resumable(study, settings(told), told)  # a fraction given explicitly is the user's, and is checked


def test_reports_and_export_best_use_each_trials_highest_rung(tmp_path: Path) -> None:
    base = [i < 430 for i in range(IMAGES)]
    _make_study(
        tmp_path / "ties.db",
        [
            (0.2, _flip(base, 30, 0), 5.0),  # trial 0: 80.0% at rung 0, the fastest
            (0.3, _flip(base, 10, 0), 6.0),  # trial 1: 84.0% at rung 0 ...
            (0.1, None, 20.0),  # trial 2: over the budget
        ],
    )
    study = _study(tmp_path / "ties.db")
    full = [i < 1800 for i in range(2000)]
    _promoted(study, 1, full)  # ... but 90.0% on 2,000 images after 60 steps at rung 1
    all_rows = rows(study)
    assert [(r.number, r.rung, r.steps, r.images) for r in all_rows[:2]] == [(0, 0, 0, 500), (1, 1, 60, 2000)]
    assert all_rows[1].accuracy == pytest.approx(0.9)
    found = recommendation(all_rows)
    assert found is not None and found.top.number == 1
    # Trial 0 stayed at rung 0: its top-1 comes from another fine-tune, so it is neither tied nor separable.
    assert not found.tied and found.runner_up is None and [r.number for r in found.not_compared] == [0]
    assert pick_best(study) == 1, "export --best takes the trial whose highest rung is best"

    shown = run_main("pareto", "--study", "ties", "--studies-dir", str(tmp_path), "--plot", str(tmp_path / "p.png"))
    assert shown.returncode == 0, shown.stderr
    words = " ".join(shown.stdout.split())
    assert (
        "Recommended: trial 1, top-1 90.00%" in words and "rung 1: 60 fine-tune steps, 2000 validation images" in words
    )
    assert "1/60" in words and "rung: where the top-1 comes from" in words
    assert "Not compared with trial 1 (rung 1): trials 0 (rung 0) on the front were read after another fine-tune" in (
        words
    )
    as_json = json.loads(
        run_main("pareto", "--study", "ties", "--studies-dir", str(tmp_path), "--format", "json").stdout
    )
    front = {r["trial"]: r for r in as_json["front"]}
    assert front[1]["rung"] == 1 and front[1]["finetune_steps"] == 60 and front[1]["images"] == 2000

    table = run_main("show", "--study", "ties", "--studies-dir", str(tmp_path), "--trial", "1")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "highest rung" in text and "rung 0" in text and "rung 1" in text and "after 60 fine-tune steps" in text
    one = json.loads(
        run_main("show", "--study", "ties", "--studies-dir", str(tmp_path), "--trial", "1", "--format", "json").stdout
    )
    assert one["highest_rung"] == 1 and [r["rung"] for r in one["rungs"]] == [0, 1]
    assert one["values"][0] == pytest.approx(0.84), "the trial's own value stays rung 0's"
    # The sampler learns rung 1 less the mean gain of the trials promoted there: trial 1 alone, so its rung-0 level.
    assert one["sampler_learns"] == pytest.approx(0.84) and "sampler learns" in text and "0.8400: the highest" in text


def test_trials_tied_at_the_same_rung_are_paired(tmp_path: Path) -> None:
    base = [i < 430 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.2, base, 9.0), (0.3, base, 6.0)])
    study = _study(tmp_path / "ties.db")
    full = [i < 1800 for i in range(2000)]
    _promoted(study, 0, full)
    _promoted(study, 1, _flip(full, 12, 4))  # 89.6%, 16 discordant images split 12:4
    found = recommendation(rows(study))
    assert found is not None and found.top.number == 0 and found.pick.number == 1
    assert [v.method for v in found.tied] == ["paired"]
    assert " ".join(" ".join(found.lines()).split()).count("rung 1: 60 fine-tune steps") == 2


def test_a_trial_left_at_rung_0_is_never_tied_with_nor_picked_over_promoted_ones(tmp_path: Path) -> None:
    base = [i < 400 for i in range(IMAGES)]
    _make_study(
        tmp_path / "ties.db",
        [
            (0.3, _flip(base, 12, 0), 4.7),  # trial 0: 77.6% after 30 steps on 500 images, the fastest; not promoted
            (0.2, base, 5.3),  # trial 1: 80.0% at rung 0 ...
            (0.25, _flip(base, 5, 0), 5.0),  # trial 2: 79.0% at rung 0 ...
        ],
    )
    study = _study(tmp_path / "ties.db")
    full = [i < 1600 for i in range(2000)]
    _promoted(study, 1, full)  # ... 80.0% on 2,000 images at rung 1, the most accurate
    _promoted(study, 2, _flip(full, 12, 4))  # ... 79.6%, tied with trial 1 on the same images
    found = recommendation(rows(study))
    assert found is not None and found.top.number == 1
    # Before, trial 0's wide rung-0 interval overlapped trial 1's rung-1 one: "tied", and the fastest "tied"
    # trial, one that ASHA had not promoted, was recommended on the 30-step signal promotion exists to replace.
    assert [v.other.number for v in found.tied] == [2] and found.pick.number == 2
    assert [r.number for r in found.not_compared] == [0] and found.to_dict()["not_compared"] == [0]
    assert pick_best(study) == 2


def test_weights_saved_for_another_architecture_are_refused_not_continued_from(tmp_path: Path) -> None:
    import torch

    from search.study.trial_weights import load_weights_into, save_weights

    model = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "rung-0.pt", model, steps=30, arch_hash="aaaa")
    assert load_weights_into(torch.nn.Linear(3, 2), tmp_path / "rung-0.pt", "aaaa")["steps"] == 30
    # a deleted study's file of the same name whose shapes happen to fit
    with pytest.raises(ValueError, match="another architecture"):
        load_weights_into(torch.nn.Linear(3, 2), tmp_path / "rung-0.pt", "bbbb")


def test_a_rung_the_database_could_not_record_is_left_for_a_rerun_not_marked_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import search.study.promotion as promotion
    from search.progress import RecordingReporter

    ended: list[str] = []
    claim = SimpleNamespace(
        lost=False,
        held=lambda: True,
        failed=lambda message: ended.append("failed"),
        stopped=lambda: ended.append("stopped"),
        done=lambda: ended.append("done"),
    )

    def locked(key: str, value: object) -> None:
        raise RuntimeError("database is locked")  # SQLite busy past its timeout, say

    study = SimpleNamespace(user_attrs={}, set_user_attr=locked)
    monkeypatch.setattr(promotion, "_run", lambda *args: {"rung": 1, "accuracy": 0.8})
    reporter = RecordingReporter()
    trial = SimpleNamespace(number=3)
    assert promotion._promote(study, trial, 1, None, None, claim, reporter) is None  # type: ignore[arg-type]
    # A failed claim is never tried again; a stopped one is taken over by the next worker or a rerun.
    assert ended == ["stopped"] and "it will be redone" in reporter.warnings[0]

    def broken(*args: object) -> dict:
        raise OSError("weights file unreadable")  # a fault a retry would meet again

    monkeypatch.setattr(promotion, "_run", broken)
    ended.clear()
    assert promotion._promote(study, trial, 1, None, None, claim, reporter) is None  # type: ignore[arg-type]
    assert ended == ["failed"]


def test_a_worker_whose_promotion_was_taken_over_leaves_the_new_holders_weights_alone(digits32, tmp_path: Path) -> None:
    """A worker silent past the heartbeat limit (suspended, say) loses its claim to another worker; when it wakes
    and finishes, it must not replace the rung's weights the new holder wrote (nor record the rung)."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from search.progress import RecordingReporter
    from search.study.promotion import _promote
    from search.study.rungs import PromotionSettings
    from search.study.trial_weights import save_weights, weights_path
    from search.training.finetune import TrainSettings
    from tests.test_uncertainty import _policy

    path = tmp_path / "ties.db"
    _make_study(path, [(0.1, [True] * 10, 5.0)])
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.load_study(study_name="ties", storage=storage)
    trial = study.trials[0]
    trial.user_attrs["policy"] = _policy(0.1)  # pruned: a promotion fine-tunes it and saves its weights
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    folder = tmp_path / "weights"
    save_weights(weights_path(folder, 0, 0), model, steps=2, arch_hash=None)
    ctx = SimpleNamespace(baseline=model, data=digits32, finetune=TrainSettings(steps=0, batch_size=8, device="cpu"))
    settings = PromotionSettings(rung_steps=(3,), fraction=1 / 3, folder=folder)

    claim = claim_promotion(storage, study, 0, 1)
    assert claim is not None and claim.held()
    # Another worker took the claim over and wrote the rung's weights (its own fine-tune) while this one slept.
    study.set_user_attr(claim_key(0, 1), {"host": "other", "pid": 1, "beat": time.time(), "token": "theirs"})
    theirs = weights_path(folder, 0, 1)
    save_weights(theirs, model, steps=3, arch_hash="theirs")
    reporter = RecordingReporter()
    assert _promote(study, trial, 1, ctx, settings, claim, reporter) is None  # type: ignore[arg-type]
    assert not claim.held() and "another worker took over promoting trial 0" in reporter.warnings[0]
    assert torch.load(theirs, weights_only=True)["arch_hash"] == "theirs", "the new holder's weights are untouched"
    assert rung_key(0) not in study.user_attrs and read_claim(storage, study._study_id, claim_key(0, 1)) is not None
    assert "theirs" in (read_claim(storage, study._study_id, claim_key(0, 1)) or ""), "their claim is left as is"
    claim._end()


def _open_claims(url: str) -> tuple[list[tuple[int, int]], dict]:
    """Promotions claimed and not finished, and the study's user attributes (read without loading torch)."""
    try:
        study = optuna.load_study(study_name="promo", storage=url)
    except KeyError:
        return [], {}
    attrs = study.user_attrs
    claims = []
    for key, value in attrs.items():
        if key.startswith("promotion:") and isinstance(value, dict) and not value.get("done"):
            number, rung = (int(part) for part in key.split(":")[1:])
            if len(attrs.get(f"rung:{number}", [])) < rung:  # its rung is recorded before the claim is marked done
                claims.append((number, rung))
    return claims, attrs


@pytest.mark.slow
def test_kill_9_during_a_promotion_then_a_rerun_completes_it_from_the_saved_weights(
    tmp_path: Path, trained_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import torch

    from search.pruning.policy import Policy
    from search.study import promotion as promotion_module
    from search.study.trial_weights import weights_path

    flags = [
        "search",
        "--budget-ms",
        "1000000",
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
        "--trials",
        "4",
        "--rungs",
        "4,8",
        "--promote-fraction",
        "0.5",
        "--studies-dir",
        str(tmp_path),
        "--study",
        "promo",
    ]
    url = f"sqlite:///{tmp_path / 'promo.db'}"
    process = subprocess.Popen(
        [sys.executable, "cli.py", *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed: tuple[int, int] | None = None
    deadline = time.time() + 1200
    while process.poll() is None and time.time() < deadline:
        claims, attrs = _open_claims(url)
        finished = {k: v for k, v in attrs.items() if k.startswith("rung:")}
        pruned = [
            (n, r)
            for n, r in claims
            if weights_path(tmp_path / "promo" / "trial-weights", n, 0).exists()  # a fine-tuned, pruned trial
        ]
        if pruned and finished:  # some rung is finished, and a pruned trial's promotion is under way
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = pruned[0]
            break
        time.sleep(0.2)
    assert killed is not None, "the search ended before a promotion could be killed"
    _, before = _open_claims(url)
    number, rung = killed
    assert len(before.get(rung_key(number), [])) == rung - 1, "the killed rung was not recorded"
    finished = {k: v for k, v in before.items() if k.startswith("rung:")}

    real = promotion_module.train
    started_from: list[tuple[int, int, bool]] = []

    def checked(model, *args, **kwargs):  # the model a promotion trains on is the previous rung's saved one
        n, r = (int(w) for w in kwargs["description"].split()[2::3])
        saved = torch.load(weights_path(tmp_path / "promo" / "trial-weights", n, r - 1), weights_only=True)
        same = all(torch.equal(v, saved["state_dict"][k]) for k, v in model.state_dict().items())
        started_from.append((n, r, same))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(promotion_module, "train", checked)
    rerun = run_main(*flags)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"Taking over the promotion of trial {number} to rung {rung}" in " ".join(rerun.stdout.split())
    study = optuna.load_study(study_name="promo", storage=url)
    attrs = study.user_attrs
    for key, records in finished.items():  # nothing finished before the kill was lost or redone
        assert attrs[key][: len(records)] == records, key
    completed = attrs[rung_key(number)][rung - 1]
    assert completed["rung"] == rung and completed["steps"] == (4, 8)[rung - 1]
    assert completed["continued_from"]["steps"] == (2, 4)[rung - 1]
    assert (number, rung, True) in started_from and all(same for _, _, same in started_from), started_from
    assert completed["images"] == 269, "a promoted rung is read on all of the validation split"
    assert next(r for r in rows(study) if r.number == number).rung >= rung, "the reports use the new rung"
    notes = study._storage.get_study_system_attrs(study._study_id)
    assert any(f"rung {rung}: top-1" in str(v) for k, v in notes.items() if "note_str" in k), "the dashboard says it"
    unpruned = next(t for t in study.trials if Policy.from_dict(t.user_attrs["policy"]).is_unpruned)
    baseline = unpruned.user_attrs["accuracy_record"]
    assert baseline["images"] == 269 and baseline["per_image"], "the baseline pairs with the others, image by image"
    above = study.user_attrs.get(rung_key(unpruned.number), [])
    for record in above:  # where promoted: it was read when the study was created, on all 269 images, never again
        assert record["reused_from_rung"] == record["rung"] - 1 and record["seconds"] == {}, record


def test_a_promoted_int8_trial_is_read_on_its_int8_model_on_all_validation_images(digits32) -> None:
    from types import SimpleNamespace

    from torch import nn

    from search.measuring.quantize import QuantizeSettings
    from search.study.promotion import _score

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    ctx = SimpleNamespace(
        data=digits32, finetune=SimpleNamespace(device="cpu"), quantize=QuantizeSettings(calibration_images=32)
    )
    seconds: dict[str, float] = {}
    correct, extra = _score(model, ctx, "int8", seconds, None)  # type: ignore[arg-type]
    assert len(correct) == len(digits32.split("val")), "all of the validation split"
    assert extra["evaluated_in"] == "onnxruntime" and 0.0 <= extra["accuracy_fp32"] <= 1.0
    assert set(seconds) == {"quantize", "evaluate"}
    subset, _ = _score(model, ctx, "int8", {}, 100)  # type: ignore[arg-type]  # --rung-val-images 100
    assert len(subset) == 100


def test_a_promotion_reads_at_most_rung_val_images_the_same_subset_for_every_trial(digits32, tmp_path: Path) -> None:
    """On a large validation split (ImageNet's 50,000) a promotion reads a fixed subset of --rung-val-images, the
    same images for every trial, so its records pair; a split no larger is read whole, as before the flag."""
    from torch import nn

    from search.study.promotion import _score
    from search.study.settings import check_resumable
    from search.study.uncertainty import SUBSET_ORDER

    assert _config(_parse()).promotion_val_images is None, "rung 0 reads all of val: so does every promotion"
    default = _config(_parse("--val-images", "2000"))
    assert default.promotion_val_images == 10_000 and promotion_settings(default).val_images == 10_000  # type: ignore[union-attr]
    assert _config(_parse("--val-images", "20000")).promotion_val_images == 20_000, "never fewer than rung 0 read"
    assert _config(_parse("--rung-val-images", "all")).promotion_val_images is None
    assert _config(_parse("--rung-val-images", "all", "--val-images", "500")).promotion_val_images is None
    assert _config(_parse("--rung-val-images", "800", "--val-images", "500")).promotion_val_images == 800
    assert "read on a fixed 10,000 of the 50,000 validation images (--rung-val-images)" in promotion_line(
        default, promotion_settings(default), 50_000
    )
    assert "read on all 5,000 validation images" in promotion_line(default, promotion_settings(default), 5_000)
    refused = run_main("search", "--budget-ms", "5", "--studies-dir", str(tmp_path), "--rung-val-images", "0")
    assert refused.returncode == 2 and "--rung-val-images: must be a positive whole number or all" in refused.stderr

    torch_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    ctx = argparse.Namespace(data=digits32, finetune=argparse.Namespace(device="cpu"))
    first, _ = _score(torch_model.eval(), ctx, "fp32", {}, 120)  # type: ignore[arg-type]
    again, _ = _score(torch_model.eval(), ctx, "fp32", {}, 120)  # type: ignore[arg-type]
    assert len(first) == 120 and first.tolist() == again.tolist(), "the same images, in the same order"

    # Two trials' capped rung-1 records pair with each other, never with a whole-split one.
    base = [i < 430 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.2, base, 9.0), (0.3, base, 6.0)])
    study = _study(tmp_path / "ties.db")
    capped = [i < 1800 for i in range(2000)]
    for number, correct in ((0, capped), (1, _flip(capped, 12, 4))):
        record = {"rung": 1, "steps": 60, "accuracy": sum(correct) / len(correct), **accuracy_record(correct)}
        study.set_user_attr(rung_key(number), [{**record, "order": SUBSET_ORDER, "seconds": {"evaluate": 1.0}}])
    assert {r.order for r in rows(study)} == {SUBSET_ORDER}
    found = recommendation(rows(study))
    assert found is not None and [v.method for v in found.tied] == ["paired"]
    _promoted(study, 1, _flip(capped, 12, 4))  # recorded before the mark existed: a read of the whole split
    assert trial_rungs(study.trials[1], study.user_attrs)[-1].order == "split"
    found = recommendation(rows(study))
    assert found is not None and [v.method for v in found.tied] == ["intervals"], "other images: no pairing"

    # A study made before the flag promoted on all of val: it resumes with --rung-val-images all, and is refused
    # with a cap that would read fewer images (one line naming the flag).
    study.set_user_attr("settings", {"rungs": [300], "val_images": 2000})
    check_resumable(study, {"rungs": [300], "rung_val_images": None}, default)
    with pytest.raises(Exception, match=r"different --rung-val-images \(all of val, now 10000\)"):
        check_resumable(study, {"rungs": [300], "rung_val_images": 10_000}, default)


def test_the_unpruned_model_is_not_read_again_above_rung_1() -> None:
    """It is never fine-tuned, and rung 1 read it on all validation images: a higher rung reuses that record."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from search.pruning.space import load_space
    from search.study.promotion import _run

    space = load_space("spaces/resnet18.toml")
    trial = create_trial(
        values=[0.9, 1.0],
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"policy": space.unpruned().to_dict()},
    )
    rung1 = {"rung": 1, "steps": 0, "accuracy": 0.9, "images": 400, "correct": 360, "seconds": {"evaluate": 16.0}}
    record = _run(trial, 2, None, None, None, [rung1])  # type: ignore[arg-type]  # nothing to train or read
    assert record["rung"] == 2 and record["reused_from_rung"] == 1
    assert record["accuracy"] == 0.9 and record["images"] == 400 and record["seconds"] == {}


def test_the_unpruned_model_that_read_every_image_at_rung_0_is_not_read_again_at_rung_1(digits32) -> None:
    """When the trials read the whole validation split (``--val-images`` at least its size), the unpruned model's
    rung-0 record is already the full read a promotion would make: it stands for rung 1, image by image."""

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from search.pruning.space import load_space
    from search.study.promotion import _unpruned_reuse

    size = len(digits32.split("val"))
    space = load_space("spaces/resnet18.toml")

    def unpruned(images: int, whole_split: bool = True):
        correct = [i % 10 != 0 for i in range(images)]
        return create_trial(
            values=[sum(correct) / images, 1.0],
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            user_attrs={
                "policy": space.unpruned().to_dict(),
                "accuracy_record": accuracy_record(correct, whole_split=whole_split),
            },
        )

    whole = unpruned(size)
    record = _unpruned_reuse(whole, 1, [])
    assert record is not None and record["rung"] == 1 and record["reused_from_rung"] == 0
    assert record["images"] == size and record["steps"] == 0 and record["seconds"] == {}
    assert record["per_image"] == whole.user_attrs["accuracy_record"]["per_image"], "pairs with the promoted trials"
    assert record["accuracy"] == pytest.approx(whole.values[0])
    assert _unpruned_reuse(unpruned(size // 2, False), 1, []) is None, "read on a subset: rung 1 reads all of val"
    assert _unpruned_reuse(unpruned(size, False), 1, []) is None, "an older study's shuffled read: read again"


def test_a_read_of_at_least_the_whole_split_is_in_the_splits_own_order(digits32) -> None:
    """A brief score with ``--val-images`` past the split's size pairs image by image with a full read."""
    import numpy as np
    from torch import nn

    from search.training.evaluate import top1_correct

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    full = top1_correct(model, digits32, "val")
    past = top1_correct(model, digits32, "val", limit=len(digits32.split("val")) + 100)
    assert np.array_equal(full, past)
    subset = top1_correct(model, digits32, "val", limit=len(digits32.split("val")) - 1)
    assert len(subset) == len(full) - 1


def test_weights_that_do_not_fit_on_the_disk_leave_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    from torch import nn

    from search.study import trial_weights

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trial_weights.torch, "save", full)
    path = trial_weights.weights_path(tmp_path, 3, 0)
    with pytest.raises(OSError, match="No space"):
        trial_weights.save_weights(path, nn.Linear(2, 2), steps=1, arch_hash=None)
    assert list(path.parent.iterdir()) == [], "nothing half-written stays in the trial's folder"
