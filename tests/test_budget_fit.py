"""--fit-budget: a sampled policy keeps its shape and lands just under the budget, by measurement."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.onnx_export import export_onnx
from search.measuring.timing import LatencySettings, measure
from search.models.build import build_model
from search.pruning.budget_fit import fit_to_budget, strength_grid
from search.pruning.policy import Policy
from search.pruning.space import SPACES_DIR, load_space
from search.study.trial import TrialContext, run_trial
from search.training.finetune import TrainSettings

SPACE = load_space(SPACES_DIR / "resnet18.toml").with_precisions(("fp32",))


def _shape(ratios: dict[str, tuple[float, float]], criterion: str = "taylor", round_to: int = 16) -> Policy:
    policy = SPACE.allocated(ratios, criterion)
    return Policy(stages=policy.stages, round_to=round_to, precision="fp32")


def test_the_strength_grid_keeps_the_shape_criteria_and_rounding() -> None:
    sampled = _shape({"layer1": (0.0, 0.3), "layer2": (0.5, 0.1), "layer3": (0.2, 0.2), "layer4": (0.7, 0.0)})
    grid = strength_grid(SPACE, sampled)
    assert sampled in [p for _, p in grid], "strength 1 is the sample itself"
    kept = [sum((1 - s.stream) + (1 - s.inner) for s in p.stages.values()) for _, p in grid]
    assert kept == sorted(kept, reverse=True), "least pruned first"
    assert len({p.key() for _, p in grid}) == len(grid)
    for _, policy in grid:
        assert policy.round_to == 16 and {s.criterion for s in policy.stages.values()} == {"taylor"}
        assert policy.stages["layer1"].stream == 0.0 and policy.stages["layer4"].inner == 0.0, "untouched stays so"
        assert all(s.stream <= 0.7 and s.inner <= 0.7 for s in policy.stages.values()), "within the space's ranges"
    strongest = grid[-1][1]
    assert strongest.stages["layer2"].stream == 0.7 and strongest.stages["layer1"].inner == 0.7


def test_a_policy_that_prunes_nothing_has_no_shape_to_fit() -> None:
    assert fit_to_budget(SPACE.unpruned(), SPACE, 1.0, 2.0, lambda p: pytest.fail("nothing to measure")) is None


@pytest.mark.slow
def test_sampled_policies_are_fitted_to_the_budget_and_recipes_are_not(digits32, trained_weights: Path) -> None:
    baseline = build_model("resnet18", digits32.num_classes)
    baseline.load_state_dict(torch.load(trained_weights))
    baseline.eval()
    baseline_onnx = export_onnx(baseline, digits32.example_input())
    settings = LatencySettings(threads=1)
    baseline_ms = measure(baseline_onnx, tuple(digits32.example_input().shape), settings).median_ms
    budget_ms = 0.5 * baseline_ms
    timer = LocalTimer(settings)
    meter = CandidateMeter(
        baseline, digits32, space=SPACE, timer=timer, baseline_ms=baseline_ms, baseline_onnx=baseline_onnx
    )
    ctx = TrialContext(
        meter=meter,
        baseline_accuracy=0.9,
        data=digits32,
        space=SPACE,
        budget_ms=budget_ms,
        finetune=TrainSettings(steps=1, batch_size=16),
        bn_batches=1,
        hardware={},
        val_images=64,
        fit_budget=True,
    )
    study = optuna.create_study(directions=["maximize", "minimize"])
    heavy = SPACE.params_for(SPACE.uniform(0.7, criterion="l2"))  # far faster than the budget needs
    study.enqueue_trial(heavy)
    study.enqueue_trial(heavy, user_attrs={"recipe": "uniform 0.7 l2"})

    trial = study.ask()
    outcome = run_trial(trial, ctx)
    attrs = trial.user_attrs
    fitted = Policy.from_dict(attrs["policy"])
    assert outcome.feasible and outcome.latency_ms <= budget_ms
    assert attrs["latency"]["measured_at"] == "budget fit", "judged by the measurement that chose it"
    assert attrs["fine_tuned"] is True
    assert all(s.stream < 0.7 for s in fitted.stages.values()), "the sample left budget unused: it was relaxed"
    assert {s.criterion for s in fitted.stages.values()} == {"l2"}
    measured = attrs["budget_fit"]["measured"]
    chosen = attrs["budget_fit"]["strength"]
    assert any(m["strength"] == chosen and m["how"] == "full" and m["ratio"] <= 0.5 for m in measured), measured
    assert sum(m["how"] == "full" for m in measured) < len(measured), "probed, then timed in full"
    judged = {}  # each strength by its last word: a full timing overrides the probe that led to it
    for m in measured:
        judged[m["strength"]] = m["ratio"]
    weaker = [ratio for strength, ratio in judged.items() if strength < chosen]
    assert weaker and all(r > 0.5 for r in weaker), "the least pruned of its shape that meets the budget"
    study.tell(trial, (outcome.accuracy, outcome.latency_ms))

    recipe = study.ask()
    run_trial(recipe, ctx)
    assert "budget_fit" not in recipe.user_attrs, "enqueued recipes run as they are"
    assert Policy.from_dict(recipe.user_attrs["policy"]).stages["layer3"].stream == 0.7
