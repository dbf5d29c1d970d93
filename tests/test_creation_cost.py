"""What creating a study costs: its phases are timed, recorded and printed, and the cheaper table and
budget searches still choose what the full ones chose."""

from __future__ import annotations

import random
import time
from pathlib import Path

import optuna
import pytest

from search.progress import RecordingReporter
from search.pruning.latency_aware import (
    FLAT_SAVING,
    Probe,
    SensitivityTable,
    allocation_path,
    probe_stages,
)
from search.pruning.recipes import Measured, bracket_search, budget_matched
from search.study.creation_clock import CREATION_SECONDS, OTHER, CreationClock, creation_line
from search.study.storage import open_storage


def test_the_clock_says_each_phase_with_its_seconds_records_them_on_the_study_and_a_line_sums_them(
    tmp_path: Path,
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    reporter = RecordingReporter()
    clock = CreationClock(reporter, every=0.1)
    with clock.phase("baseline (load, or train)"):
        time.sleep(0.05)
    clock.attach(study)  # recorded from the start, the phases before the study existed included
    with clock.phase("latency-aware tables"):
        time.sleep(0.35)  # longer than every=0.1: lines while it runs
    with clock.phase("uniform recipe's bisection"):
        clock.count()
        clock.count()
    with clock.phase("start-up samples near the budget"):
        clock.count(probe=True)
        clock.count(probe=True)
        clock.count()
    time.sleep(0.1)
    clock.settle()
    clock.stop()
    assert reporter.phases == [
        "baseline (load, or train)",
        "latency-aware tables",
        "uniform recipe's bisection",
        "start-up samples near the budget",
    ]
    assert any(
        line.startswith("Setup: uniform recipe's bisection, 0.0 s, 2 latency measurements (") for line in reporter.infos
    )
    ended = [line for line in reporter.infos if line.startswith("Setup: latency-aware tables, 0.")]
    assert len(ended) == 1 and "s since the data was ready" in ended[0], reporter.infos
    assert any(line.startswith("Setup: latency-aware tables, running for") for line in reporter.infos)
    stored = optuna.load_study(study_name="s", storage=storage).user_attrs[CREATION_SECONDS]
    assert stored["phases"]["latency-aware tables"] >= 0.3 and stored["phases"]["baseline (load, or train)"] < 0.3
    assert stored["phases"][OTHER] >= 0.05, "the time between the phases is accounted for"
    assert stored["total"] == pytest.approx(sum(stored["phases"].values()), abs=0.2)
    line = creation_line(optuna.load_study(study_name="s", storage=storage))
    assert line is not None and line.startswith("Set-up before the first trial: ")
    assert line.index("latency-aware tables") < line.index("baseline"), "the costliest phase first"
    assert "uniform recipe's bisection 0.0 s (2 measured)" in line
    assert "start-up samples near the budget 0.0 s (3 measured, 2 by quick probe)" in line
    assert any("near the budget, 0.0 s, 3 latency measurements (2 of them quick probes)" in x for x in reporter.infos)

    rerun = CreationClock(RecordingReporter())  # a rerun that finishes the creation adds to what was recorded
    rerun.attach(study)
    with rerun.phase("latency-aware tables"):
        pass
    assert rerun.phases()["latency-aware tables"] >= 0.3 and "baseline (load, or train)" in rerun.phases()


def _measured(ratios: list[float], estimates: list[float] | None, fraction: float) -> tuple[int | None, list[int]]:
    """The grid index the search returns and the indexes it measured (the grid's policies are their indexes)."""
    asked: list[int] = []

    def ratio(i: int) -> float:
        asked.append(i)
        return ratios[i]

    grid = [(float(i), i) for i in range(len(ratios))]
    found = budget_matched(grid, fraction, ratio, estimates)  # type: ignore[arg-type]
    return (None if found is None else int(found[0])), asked


def test_the_estimated_start_finds_the_boundary_bisection_finds_in_fewer_measurements() -> None:
    rng = random.Random(0)
    plain_total = guided_total = 0
    for case in range(600):
        smooth = case % 2 == 0
        ratios_at = [k / 20 for k in range(1, rng.randint(2, 19) + 1)]  # a grid of uniform ratios
        if smooth:  # latency about a + b (1 - r)^p with some rounding noise, estimated as (1 - r)^2
            a, power = rng.uniform(0.0, 0.3), rng.uniform(1.5, 2.5)
            measured = [(a + (1 - a) * (1 - r) ** power) * rng.uniform(0.95, 1.05) for r in ratios_at]
            ratios = sorted((min(1.0, m) for m in measured), reverse=True)
            estimates = [(1 - r) ** 2 for r in ratios_at]
        else:  # uneven steps, estimates off by a factor and noisy (they only choose what to measure)
            ratios = sorted((rng.uniform(0.02, 1.0) for _ in ratios_at), reverse=True)
            bias = rng.uniform(0.6, 1.6)
            estimates = sorted((min(1.0, r * bias * rng.uniform(0.9, 1.1)) for r in ratios), reverse=True)
        fraction = rng.uniform(0.05, 0.95)
        found, asked = _measured(ratios, estimates, fraction)
        plain, bisected = _measured(ratios, None, fraction)
        expected = next((i for i, r in enumerate(ratios) if r <= fraction), None)
        assert found == expected == plain, (ratios, fraction, estimates)
        assert len(asked) == len(set(asked)), "no point is measured twice"
        assert len(asked) <= len(bisected) + 2, (len(asked), len(bisected))
        if smooth:
            plain_total += len(bisected)
            guided_total += len(asked)
    assert guided_total < 0.75 * plain_total, (guided_total, plain_total)


def test_the_estimated_start_is_told_by_measurement_not_by_the_estimates() -> None:
    """Estimates that put the budget at the wrong end still end at a measured boundary."""
    ratios = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    wrong = [0.1] * len(ratios)  # "everything meets the budget"
    assert bracket_search(wrong, 0.45, lambda i: ratios[i]) == 5
    assert bracket_search([1.0] * len(ratios), 0.45, lambda i: ratios[i]) == 5
    assert bracket_search(wrong, 0.1, lambda i: ratios[i]) is None, "nothing meets it: measured, not estimated"


def test_probes_search_the_grid_and_only_the_answer_is_timed_in_full_stepping_on_where_it_misses() -> None:
    """Quick probes choose the point; the full timing judges it (and the next ones, should it miss)."""
    full_ratios = [0.9, 0.8, 0.7, 0.6, 0.52, 0.45, 0.3, 0.2]
    grid = [(float(i), i) for i in range(len(full_ratios))]
    for probe_ratios, expected, timed in (
        ([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.3, 0.2], 5, [4, 5]),  # the probe put index 4 within 0.5; it is not
        ([0.88, 0.79, 0.71, 0.61, 0.53, 0.44, 0.31, 0.2], 5, [5]),  # probe and full timing agree
    ):
        probed: list[int] = []
        full: list[int] = []

        def probe(i: int, ratios: list[float] = probe_ratios, probed: list[int] = probed) -> float:
            probed.append(i)
            return ratios[i]

        def confirm(i: int, full: list[int] = full) -> float:
            full.append(i)
            return full_ratios[i]

        found = budget_matched(grid, 0.5, probe, [1 - i / 8 for i in range(8)], confirm)  # type: ignore[arg-type]
        assert found is not None and found[0] == expected and found[2] == full_ratios[expected]
        assert full == timed, "only the answer (and what follows it, on a miss) is timed in full"
        assert len(probed) >= 2
    missed = budget_matched(grid, 0.1, lambda i: 0.05, None, lambda i: 0.5)  # type: ignore[arg-type,misc]
    assert missed is None, "no point meets the budget in full: none is returned on the probes' word"


def test_measured_probes_once_and_a_probed_policy_has_no_full_record() -> None:
    from search.pruning.policy import Policy

    calls: list[str] = []

    def record_of(policy: Policy) -> dict[str, float]:
        calls.append("full")
        return {"corrected_ms": 4.0}

    def probe_of(policy: Policy) -> dict[str, float]:
        calls.append("probe")
        return {"corrected_ms": 3.0}

    policy = Policy(stages={}, precision="fp32")
    measured = Measured(record_of, 10.0, probe_of)
    assert measured.rough(policy) == measured.rough(policy) == 0.3 and calls == ["probe"]
    assert measured.full(policy) is None, "a start-up sample chosen by a probe: its trial times it in full"
    assert measured.ratio(policy) == 0.4 and measured.rough(policy) == 0.4, "a full timing, once known, is the word"
    assert calls == ["probe", "full"] and measured.full(policy) == {"corrected_ms": 4.0}
    plain = Measured(record_of, 10.0)
    assert plain.rough(policy) == 0.4 and plain.full(policy) is not None, "without probes, rough is the full timing"


def _truth(stage: str, level: float) -> Probe:
    """10 ms, 90% unpruned. 'cheap' gives 4 ms for 1 pp; 'costly' 3 ms for 30 pp (mostly past its middle);
    'tiny' 0.1 ms for 5 pp; 'free' 2 ms for nothing."""
    saved, drop = {
        "cheap": (4.0 * level, 0.01 * level),
        "costly": (3.0 * level, 0.30 * level**3),
        "tiny": (0.1 * level, 0.05 * level),
        "free": (2.0 * level, 0.0),
    }[stage]
    return Probe(level, 10.0 - saved, 0.9 - drop)


def test_the_cheaper_table_probes_the_middle_only_where_it_informs_and_allocates_as_the_full_one() -> None:
    stages = ["cheap", "costly", "tiny", "free"]
    asked: list[tuple[str, float]] = []

    def probe(stage: str, level: float) -> Probe:
        asked.append((stage, level))
        return _truth(stage, level)

    probes, skipped = probe_stages(stages, probe, baseline_ms=10.0, baseline_accuracy=0.9, val_images=1000)
    assert sorted(asked) == sorted([(s, 1.0) for s in stages] + [("cheap", 0.5), ("costly", 0.5)])
    assert [s.split(":")[0] for s in skipped] == ["tiny", "free"]
    assert 0.1 / 10.0 < FLAT_SAVING, "'tiny' saves too little to be probed in between"
    cheap = SensitivityTable(10.0, 0.9, probes)
    full = SensitivityTable(10.0, 0.9, {s: tuple(_truth(s, lv) for lv in (1 / 3, 2 / 3, 1.0)) for s in stages})
    for budget in (8.0, 6.0, 4.5, 3.5):
        mine = next(a for a in allocation_path(cheap) if a.estimated_ms <= budget)
        theirs = next(a for a in allocation_path(full) if a.estimated_ms <= budget)
        assert mine.levels == theirs.levels, (budget, mine.levels, theirs.levels)
    at_6 = next(a for a in allocation_path(cheap) if a.estimated_ms <= 6.0)
    assert at_6.levels == {"free": 1.0, "cheap": 0.5, "costly": 0.0, "tiny": 0.0}, "free, then cheap milliseconds"

    swapped = dict(probes)  # a table that mixed the stages up allocates differently: the test can fail
    swapped["cheap"], swapped["costly"] = probes["costly"], probes["cheap"]
    wrong = next(a for a in allocation_path(SensitivityTable(10.0, 0.9, swapped)) if a.estimated_ms <= 6.0)
    assert wrong.levels != at_6.levels
