"""The latency-aware recipe: the allocation from given tables, and the recipe in a real tiny study."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from search.data.spec import DataSpec
from search.progress import RecordingReporter
from search.pruning.latency_aware import (
    PROBE_LEVELS,
    Allocation,
    Probe,
    SensitivityTable,
    allocation_path,
    estimated_fraction,
    path_policies,
)
from search.pruning.space import parse_space
from search.study import later_setup as later_module
from search.study.config import SearchConfig
from search.study.coordination import progress
from search.study.front import rows
from search.study.run import run_search
from tests.conftest import run_main

SPACE = """
round_to = [8]
ratio_step = 0.05
uniform_ratios = []
[stages.early]
modules = ["conv1", "bn1", "layer1", "layer2"]
stream = [0.0, 0.6]
inner = [0.0, 0.8]
[stages.late]
modules = ["layer3", "layer4"]
stream = [0.0, 0.6]
inner = [0.0, 0.8]
"""


THREE_LEVELS = (1 / 3, 2 / 3, 1.0)
"""The levels studies measured every stage at before the cheaper tables (their stored tables stay valid)."""


def _table() -> SensitivityTable:
    """10 ms unpruned; 'early' gives 4 ms for 1 pp, 'late' 2 ms for 20 pp, 'head' 0.5 ms for nothing."""

    def probes(ms_at_full: float, drop_at_full: float) -> tuple[Probe, ...]:
        return tuple(Probe(level, 10.0 - ms_at_full * level, 0.9 - drop_at_full * level) for level in PROBE_LEVELS)

    return SensitivityTable(
        baseline_ms=10.0,
        baseline_accuracy=0.9,
        stages={"early": probes(4.0, 0.01), "late": probes(2.0, 0.20), "head": probes(0.5, 0.0)},
    )


def allocate(table: SensitivityTable, budget_ms: float) -> Allocation | None:
    """The least pruned point of the path estimated to meet ``budget_ms`` (the study then bisects on measurement)."""
    return next((a for a in allocation_path(table) if a.estimated_ms <= budget_ms), None)


def test_allocation_meets_the_estimated_budget_and_takes_the_cheap_stages_first() -> None:
    table = _table()
    assert allocate(table, 7.0).levels["late"] == 0.0, "the cheap stages alone meet 70%"
    chosen = allocate(table, 5.0)
    assert chosen is not None and chosen.estimated_ms <= 5.0
    assert chosen.levels["early"] == 1.0 and chosen.levels["head"] == 1.0, "free and cheap milliseconds first"
    assert 0.0 < chosen.levels["late"] <= 1 / 3, "the costly stage gives only what is still missing"
    assert chosen.estimated_drop == pytest.approx(0.01 + 0.20 * chosen.levels["late"])

    path = allocation_path(table)
    assert path[0].estimated_ms == 10.0 and all(v == 0.0 for v in path[0].levels.values())
    for before, after in itertools.pairwise(path):
        assert after.estimated_ms < before.estimated_ms
        assert all(after.levels[s] >= before.levels[s] for s in before.levels), "each point prunes more"
    assert path[-1].levels == {"early": 1.0, "late": 1.0, "head": 1.0}
    assert allocate(table, 3.0) is None, "below what pruning every stage fully is estimated to give"


def test_allocation_skips_a_level_that_saves_nothing_and_ignores_noise_in_accuracy() -> None:
    # 'early' at its first level measured slower than unpruned (channel rounding), and more accurate (noise).
    low, mid, high = THREE_LEVELS
    early = (Probe(low, 10.1, 0.91), Probe(mid, 8.0, 0.895), Probe(high, 7.0, 0.85))
    late = tuple(Probe(level, 10.0 - level, 0.9 - 0.2 * level) for level in THREE_LEVELS)
    table = SensitivityTable(10.0, 0.9, {"early": early, "late": late})
    assert table.accuracy_drop("early", low) == 0.0 and table.saved_ms("early", low) < 0
    path = allocation_path(table)
    assert path[1].levels["late"] == 0.0 and path[1].levels["early"] > low, "past where the stage saves nothing"
    assert all(p.levels["early"] not in (low / 2, low) for p in path), "never at a level slower than unpruned"
    assert SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_path_policies_are_the_spaces_policies_pruning_the_cheap_stage_more() -> None:
    space = parse_space(SPACE, "tiny")
    table = SensitivityTable(
        10.0,
        0.9,
        {
            "early": tuple(Probe(level, 10.0 - 5 * level, 0.9 - 0.01 * level) for level in PROBE_LEVELS),
            "late": tuple(Probe(level, 10.0 - 2 * level, 0.9 - 0.3 * level) for level in PROBE_LEVELS),
        },
    )
    grid = path_policies(space, table, "fp32")
    fractions = [f for f, _ in grid]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] == pytest.approx(0.3)
    halfway = next(p for f, p in grid if f <= 0.7)
    assert halfway.stages["early"].inner > halfway.stages["late"].inner
    assert halfway.stages["early"].stream <= 0.6 and halfway.stages["early"].inner <= 0.8, "within the ranges"
    assert grid[-1][1].stages["early"].inner == 0.8 and grid[-1][1].stages["late"].stream == 0.6


def _tiny(tmp_path: Path, trained_weights: Path) -> SearchConfig:
    space = tmp_path / "tiny.toml"
    space.write_text(SPACE)
    return SearchConfig(
        budget_fraction=0.6,
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=32),
        space=str(space),
        study="la",
        trials=4,  # uniform and global at the budget, then latency-aware at the budget, a start-up sample
        finetune_steps=2,
        bn_batches=2,
        val_images=64,
        precisions=("fp32",),
        studies_dir=str(tmp_path / "studies"),
    )


@pytest.mark.slow
def test_a_new_study_enqueues_the_latency_aware_recipe_after_its_first_trial_and_stores_its_tables(
    tmp_path: Path, trained_weights: Path
) -> None:
    config = _tiny(tmp_path, trained_weights)
    reporter = RecordingReporter()
    result = run_search(config, reporter)
    study = result.study
    tables = study.user_attrs["latency_aware"]
    assert set(tables["stages"]) == {"early", "late"} and tables["seconds"] > 0
    probed = {name: [p["level"] for p in probes] for name, probes in tables["stages"].items()}
    assert all(levels in ([1.0], list(PROBE_LEVELS)) for levels in probed.values()), probed
    assert len(tables["skipped"]) == sum(levels == [1.0] for levels in probed.values()), "each skip says why"
    early = tables["stages"]["early"]
    assert early[-1]["latency_ms"] < tables["baseline_ms"], "pruning a stage fully makes the model faster"
    count = sum(len(levels) for levels in probed.values())
    assert any(line.startswith(f"Latency-aware tables: {count} prunings") and " s" in line for line in reporter.infos)
    before = study.user_attrs["creation_seconds"]["phases"]
    assert "latency-aware tables" not in before and "uniform recipe's bisection" in before, before
    after = study.user_attrs["setup_after_first_trial_seconds"]["phases"]
    assert after["latency-aware tables"] > 0 and "latency-aware recipe's bisection" in after, after
    assert "start-up samples near the budget" in after, after
    lines = reporter.infos
    assert any(line.startswith("Set-up before the first trial: ") for line in lines)
    assert any(line.startswith("Set-up after the first trial: ") for line in lines)
    first_trial = next(i for i, line in enumerate(lines) if line.startswith(("Trial 0 ", "Trial 0:")))
    tables_said = next(i for i, line in enumerate(lines) if line.startswith("Latency-aware tables: "))
    assert first_trial < tables_said, "the first trial does not wait for the tables"
    assert any(line.startswith("Latency-aware meets the budget") for line in lines), lines

    label = "latency-aware l1 at the budget"
    (trial,) = [t for t in study.trials if t.user_attrs.get("recipe") == label]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["fine_tuned"]
    (unpruned,) = [t for t in study.trials if t.user_attrs.get("recipe") == "unpruned"]  # over the budget
    ran_first = unpruned.datetime_start is None or trial.datetime_start < unpruned.datetime_start
    assert ran_first, "enqueued after the unpruned recipe, it still runs before it"
    assert trial.user_attrs["latency"]["measured_at"] == "the set-up after the first trial"
    assert trial.values[1] <= result.budget_ms
    assert label in {r.recipe for r in rows(study)}
    starts = [t for t in study.trials if t.user_attrs.get("start") == "near the budget"]
    assert starts, "the recipes, the latency-aware one among them, seed start-up samples near the budget"

    shown = run_main("pareto", "--study", "la", "--studies-dir", config.studies_dir, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert label in [r["recipe"] for r in json.loads(shown.stdout)["recipes"]]


@pytest.mark.slow
def test_a_failed_set_up_after_the_first_trial_is_said_once_and_the_search_goes_on(
    tmp_path: Path, trained_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the tables could not be measured")

    monkeypatch.setattr(later_module, "measure_sensitivity", broken)
    config = replace(_tiny(tmp_path, trained_weights), trials=3)
    reporter = RecordingReporter()
    result = run_search(config, reporter)
    assert not result.interrupted
    (warning,) = [w for w in reporter.warnings if "set-up after the first trial failed" in w]
    assert "RuntimeError: the tables could not be measured" in warning and "\n" not in warning
    assert progress(result.study).finished == 3, "the search went on with the recipes it had and the sampler"

    monkeypatch.undo()
    reporter = RecordingReporter()
    result = run_search(replace(config, trials=4), reporter)
    assert not [w for w in reporter.warnings if "set-up after the first trial" in w], "not tried again every run"
    assert not any(line.startswith("Latency-aware tables") for line in reporter.infos)
    assert progress(result.study).finished == 4 and result.ran >= 1


def test_the_tables_estimate_any_policy_from_each_stages_place_in_its_ranges() -> None:
    space = parse_space(SPACE, "tiny")
    table = SensitivityTable(
        baseline_ms=10.0,
        baseline_accuracy=0.9,
        stages={
            "early": tuple(Probe(level, 10.0 - 4.0 * level, 0.9) for level in PROBE_LEVELS),
            "late": tuple(Probe(level, 10.0 - 2.0 * level, 0.9) for level in PROBE_LEVELS),
        },
    )
    assert estimated_fraction(table, space, space.unpruned()) == pytest.approx(1.0)
    # Every stage at its full level: 4 + 2 ms of 10 saved.
    full = space.allocated({"early": (0.6, 0.8), "late": (0.6, 0.8)}, "l1")
    assert estimated_fraction(table, space, full) == pytest.approx(0.4, abs=0.02)
    # Half of early's stream range and none of its inner (level 0.25): 1 ms saved; late untouched.
    assert estimated_fraction(table, space, space.allocated({"early": (0.3, 0.0)}, "l1")) == pytest.approx(
        0.9, abs=0.02
    )
    # The path's own points get the estimate the path gave them.
    for estimate, policy in path_policies(space, table, "fp32"):
        assert estimated_fraction(table, space, policy) == pytest.approx(estimate, abs=0.03)
