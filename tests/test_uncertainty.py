"""Accuracies with their intervals, and recommendations that say when the top trials are tied."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from search.pruning.policy import Policy, StagePolicy
from search.study.front import pick_best, recommendation, rows
from search.study.uncertainty import accuracy_record, mcnemar_p, pack_correct, paired_counts, unpack_correct, wilson
from tests.conftest import run_main

IMAGES = 500


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: Wilson score intervals at 95%.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(1, 29) == pytest.approx((0.0061, 0.1718), abs=1e-4)
    # 2,000 images at about 84%: some 1.6 points either way.
    low, high = wilson(1686, 2000)
    assert (high - low) / 2 == pytest.approx(0.016, abs=0.001)
    with pytest.raises(ValueError):
        wilson(3, 0)


def test_per_image_correctness_packs_to_a_bit_each() -> None:
    correct = [(i * 7) % 3 != 0 for i in range(2000)]
    packed = pack_correct(correct)
    assert len(packed) == 336, "2,000 images are 250 bytes, 336 characters of base64"
    assert unpack_correct(packed, 2000) == correct
    assert unpack_correct(pack_correct([True, False, True]), 3) == [True, False, True]
    with pytest.raises(ValueError):
        unpack_correct(packed, 3000)
    record = accuracy_record(correct)
    assert record["images"] == 2000 and record["correct"] == sum(correct)
    assert record["interval"] == pytest.approx(list(wilson(sum(correct), 2000)))


def _flip(correct: list[bool], right_to_wrong: int, wrong_to_right: int) -> list[bool]:
    """A second model on the same images: it loses ``right_to_wrong`` of the first one's hits, gains some misses."""
    out = list(correct)
    rights = [i for i, c in enumerate(correct) if c][:right_to_wrong]
    wrongs = [i for i, c in enumerate(correct) if not c][:wrong_to_right]
    for i in rights:
        out[i] = False
    for i in wrongs:
        out[i] = True
    return out


def test_exact_mcnemar_tells_tied_from_separable() -> None:
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(6, 4) == pytest.approx(0.7539, abs=1e-4)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    first = [i < 430 for i in range(IMAGES)]
    close = _flip(first, 10, 5)  # 86.0% vs 85.0%: 15 discordant images split 10:5
    assert paired_counts(first, close) == (10, 5)
    assert mcnemar_p(*paired_counts(first, close)) > 0.05
    far = _flip(first, 35, 5)  # 86.0% vs 80.0%: 40 discordant images split 35:5
    assert mcnemar_p(*paired_counts(first, far)) < 0.05
    # The same two accuracies read on different images would not be judged alike: the pairing is what counts.
    assert sum(close) == 425 and sum(far) == 400


def _latency(ms: float) -> dict[str, float]:
    return {"ratio": ms / 12.0, "p90_ms": ms * 1.1, "corrected_ms": ms, "median_ms": ms}


def _policy(strength: float) -> dict:
    stages = {name: StagePolicy(stream=strength, inner=strength) for name in ("layer1", "layer2", "layer3", "layer4")}
    return Policy(stages=stages).to_dict()


def _make_study(
    path: Path,
    trials: list[tuple[float, list[bool] | None, float]],
    *,
    images: bool = True,
    split: tuple[int, ...] = (),
) -> None:
    """A study stored as a search stores it: (strength, per-image correctness, latency) per fine-tuned trial;
    the trials numbered in ``split`` read the whole split in its own order."""
    study = optuna.create_study(study_name="ties", storage=f"sqlite:///{path}", directions=["maximize", "minimize"])
    for key, value in {"budget_ms": 10.0, "baseline_latency_ms": 12.0, "baseline_accuracy": 0.9}.items():
        study.set_user_attr(key, value)
    for number, (strength, correct, ms) in enumerate(trials):
        feasible = ms <= 10.0
        attrs = {
            "policy": _policy(strength),
            "latency": _latency(ms),
            "feasible": feasible,
            "fine_tuned": feasible,
            "pruning_history": [],
        }
        accuracy = 0.0
        if feasible and correct is not None:
            accuracy = sum(correct) / len(correct)
            record = accuracy_record(correct, whole_split=number in split)
            attrs["accuracy_record"] = record if images else {}
        attrs["accuracy"] = accuracy
        study.add_trial(optuna.trial.create_trial(values=[accuracy, ms], user_attrs=attrs, params={}, distributions={}))


def _pareto(tmp_path: Path, *extra: str) -> str:
    shown = run_main(
        "pareto", "--study", "ties", "--studies-dir", str(tmp_path), "--plot", str(tmp_path / "p.png"), *extra
    )
    assert shown.returncode == 0, shown.stderr
    return " ".join(shown.stdout.split())  # rich wraps long lines: compare the words


def test_pareto_recommends_the_fastest_of_the_tied_and_lists_them(tmp_path: Path) -> None:
    first = [i < 430 for i in range(IMAGES)]
    _make_study(
        tmp_path / "ties.db",
        [
            (0.2, first, 9.0),  # trial 0: the most accurate, 86.0%
            (0.3, _flip(first, 10, 5), 6.0),  # trial 1: 85.0%, tied with trial 0 on the same images, faster
            (0.5, _flip(first, 35, 5), 4.0),  # trial 2: 80.0%, separable from trial 0
            (0.1, None, 20.0),  # trial 3: over the budget, never evaluated
        ],
    )
    out = _pareto(tmp_path)
    assert "Recommended: trial 1, top-1 85.00% ±3.1 at 6.00 ms" in out, out
    assert "Tied: trials 1, 0 cannot be told apart on the validation images" in out
    assert "rule: the fastest of the tied trials is recommended, trial 1" in out
    assert "trial 0: top-1 86.00% ±3.0 at 9.00 ms" in out and "trial 1: top-1 85.00% ±3.1 at 6.00 ms" in out
    assert "trial 2: top-1" not in out, "trial 2 is separable from the most accurate"
    assert "10 right only by the more accurate, 5 only by the other, exact McNemar p = 0.302" in out
    assert "86.00% ±3.0" in out and "80.00% ±3.5" in out, "the table shows each top-1 with its interval"
    assert "or the fastest of those tied with it" in out
    assert pick_best(optuna.load_study(study_name="ties", storage=f"sqlite:///{tmp_path / 'ties.db'}")) == 1

    shown = run_main("pareto", "--study", "ties", "--studies-dir", str(tmp_path), "--format", "json")
    answer = json.loads(shown.stdout)
    assert answer["recommended"] == 1
    assert answer["recommendation"]["tied"] == [1, 0] and answer["recommendation"]["most_accurate"] == 0
    assert answer["front"][0]["accuracy_interval"] == pytest.approx(list(wilson(400, IMAGES)))

    trial = run_main("show", "--study", "ties", "--studies-dir", str(tmp_path), "--trial", "1")
    assert "Wilson 95% interval" in trial.stdout and "500 images" in trial.stdout


def test_pareto_says_the_most_accurate_is_separable_from_the_runner_up(tmp_path: Path) -> None:
    first = [i < 430 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.2, first, 9.0), (0.5, _flip(first, 35, 5), 4.0)])
    out = _pareto(tmp_path)
    assert "Recommended: trial 0, top-1 86.00% ±3.0 at 9.00 ms" in out, out
    assert "Separable: trial 0 (top-1 86.00% ±3.0) is more accurate than the runner-up on the front, trial 1" in out
    assert "Tied:" not in out


def test_trials_read_on_different_images_fall_back_to_their_intervals(tmp_path: Path) -> None:
    first = [i < 430 for i in range(IMAGES)]
    fewer = [i < 170 for i in range(200)]  # 85.0% of 200 other images: no pairing, intervals overlap
    _make_study(tmp_path / "ties.db", [(0.2, first, 9.0), (0.3, fewer, 6.0)])
    out = _pareto(tmp_path)
    assert "Recommended: trial 1" in out and "Tied: trials 1, 0" in out, out
    assert "their Wilson 95% intervals overlap (no per-image record on the same images to pair)" in out


def test_a_read_of_the_split_in_its_own_order_never_pairs_with_a_shuffled_one(tmp_path: Path) -> None:
    """Studies made before whole-split reads kept the split's order went through it shuffled: the same count of
    images in another order must not be paired image by image (their intervals decide)."""
    first = [i < 430 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.2, first, 9.0), (0.5, _flip(first, 35, 5), 4.0)], split=(0,))
    out = _pareto(tmp_path)
    assert "Separable" not in out and "Tied: trials 1, 0" in out, out
    assert "their Wilson 95% intervals overlap (no per-image record on the same images to pair)" in out
    _make_study(tmp_path / "same.db", [(0.2, first, 9.0), (0.5, _flip(first, 35, 5), 4.0)], split=(0, 1))
    (tmp_path / "same.db").rename(tmp_path / "ties.db")
    assert "Separable: trial 0" in _pareto(tmp_path), "read the same way: paired, and told apart"


def test_older_studies_without_the_record_keep_the_most_accurate(tmp_path: Path) -> None:
    first = [i < 430 for i in range(IMAGES)]
    _make_study(tmp_path / "ties.db", [(0.2, first, 9.0), (0.3, _flip(first, 10, 5), 6.0)], images=False)
    out = _pareto(tmp_path)
    assert "Recommended: trial 0, top-1 86.00% at 9.00 ms" in out, out
    assert "Tied:" not in out and "Separable:" not in out and "±" not in out
    found = recommendation(rows(optuna.load_study(study_name="ties", storage=f"sqlite:///{tmp_path / 'ties.db'}")))
    assert found is not None and found.pick.number == 0 and found.lines() == []


def test_a_tied_trial_beaten_on_both_objectives_is_never_recommended(tmp_path: Path) -> None:
    first = [i < 430 for i in range(IMAGES)]
    # Trial 1 (80.0% of 100 other images, 4 ms) is within its wide interval of trial 0, but trial 2 (82.0%,
    # 4 ms, separable from trial 0) beats it on both objectives: the recommendation is among the front only.
    noisy = [i < 80 for i in range(100)]
    _make_study(tmp_path / "ties.db", [(0.2, first, 9.0), (0.5, noisy, 4.0), (0.4, _flip(first, 20, 0), 4.0)])
    found = recommendation(rows(optuna.load_study(study_name="ties", storage=f"sqlite:///{tmp_path / 'ties.db'}")))
    assert found is not None and found.pick.number != 1
    assert all(v.other.number != 1 for v in found.tied)
