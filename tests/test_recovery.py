"""Recovery at export: iterative pruning onto the trial's exact channels, feature distillation, their card rows."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

import search.shipping.iterative as iterative
from search.errors import UsageError
from search.models.build import build_model
from search.pruning.channels import architecture_hash, layer_channels, prune_copy
from search.pruning.groups import replay
from search.pruning.space import load_space
from search.pruning.stepwise import check_prune_steps, prune_towards, step_targets
from search.shipping.export import export_trial
from search.shipping.rebuild import load_study_baseline, rebuild_pruned
from search.shipping.settings import ExportSettings
from search.training.feature_distill import FeatureDistiller, stage_outputs
from search.training.finetune import TrainSettings, train
from tests.conftest import ROOT, run_main
from tests.test_export import QUICK, _study, tiny  # noqa: F401  (the tiny study, a fixture)

SPACE = load_space(ROOT / "spaces" / "resnet18.toml")


class Interrupted(Exception):
    """An export stopped part-way."""


@pytest.fixture(scope="module")
def baseline(trained_weights: Path) -> torch.nn.Module:
    model = build_model("resnet18", 10)
    model.load_state_dict(torch.load(trained_weights, weights_only=True))
    return model.eval()


def test_k_steps_land_on_the_trials_exact_channels(baseline, digits32) -> None:
    policy = SPACE.uniform(0.5, "l1")
    trial = prune_copy(baseline, policy, SPACE, digits32)  # what the search timed
    original = layer_channels(baseline)
    targets = step_targets(original, trial.channels, 3)
    model, histories, totals = copy.deepcopy(baseline), [], []
    for target in targets:
        histories.append(prune_towards(model, target, policy, SPACE, digits32.example_input()))
        assert {n: c for n, c in layer_channels(model).items() if n in target} == target
        totals.append(sum(layer_channels(model).values()))
    assert sum(original.values()) > totals[0] > totals[1] > totals[2], "every step removes part of the channels"
    assert layer_channels(model) == trial.channels
    assert architecture_hash(model, (3, 32, 32)) == trial.arch_hash, "the architecture the trial timed"
    replayed = copy.deepcopy(baseline)
    for history in histories:
        replay(replayed, history, digits32.example_input())
    assert layer_channels(replayed) == trial.channels, "the recorded steps rebuild it (resume, model.pt)"


def test_too_many_or_too_few_steps_are_one_line_errors(baseline, digits32) -> None:
    original = layer_channels(baseline)
    final = prune_copy(baseline, SPACE.uniform(0.2, "l1"), SPACE, digits32).channels
    fewest = min(original[n] - final[n] for n in final if original[n] > final[n])
    check_prune_steps(fewest, original, final)
    with pytest.raises(UsageError, match=rf"more than the channels allow.*at most --prune-steps {fewest}$"):
        check_prune_steps(fewest + 1, original, final)
    with pytest.raises(UsageError, match="at least 1"):
        check_prune_steps(0, original, final)
    with pytest.raises(UsageError, match="prunes nothing"):
        check_prune_steps(2, original, original)


def test_feature_distillation_trains_adapters_beside_the_model_and_never_inside_it(baseline, digits32) -> None:
    student = prune_copy(baseline, SPACE.uniform(0.5, "l1"), SPACE, digits32).model
    where = stage_outputs(baseline, [(s.name, s.modules) for s in SPACE.stages], digits32.example_input())
    assert where == {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    batch = next(digits32.batches("train", 32, shuffle=True, augment=False))
    features = FeatureDistiller(student, baseline, where, 1.0, batch)
    assert set(features.adapters) == set(where), "the stream channels were pruned in every stage"
    keys = set(student.state_dict())
    before = {k: v.clone() for k, v in features.state_dict().items()}
    train(student, digits32, TrainSettings(steps=4, distill=0.0), teacher=baseline, features=features)
    assert any(not torch.equal(before[k], v) for k, v in features.state_dict().items()), "the adapters trained"
    assert set(student.state_dict()) == keys, "no adapter became part of the pruned model"
    assert not any("adapter" in name for name, _ in student.named_modules())


@pytest.mark.slow
def test_iterative_export_with_feature_distillation_ships_the_timed_architecture(tiny, tmp_path: Path) -> None:  # noqa: F811
    base = load_study_baseline(_study(tiny))
    trial = _study(tiny).trials[3]
    settings = replace(QUICK, steps=6, prune_steps=3, feature_distill=0.5)
    card = export_trial(base, 3, settings, tmp_path / "t", command="python cli.py export --prune-steps 3")
    assert card["channels"] == layer_channels(rebuild_pruned(base, trial)), "the channels the trial timed"
    schedule = card["pruning_schedule"]
    assert schedule["prune_steps"] == 3 and [s["optimizer_steps"] for s in schedule["steps"]] == [2, 2, 2]
    totals = [s["total_channels"] for s in schedule["steps"]]
    assert schedule["unpruned_total_channels"] > totals[0] > totals[1] > totals[2] == sum(card["channels"].values())
    assert schedule["steps"][-1]["channels"] == card["channels"] and card["finetune"]["steps"] == 6
    assert card["feature_distill"]["weight"] == 0.5 and set(card["feature_distill"]["stages"]) == {
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    }
    text = (tmp_path / "t" / "card.md").read_text()
    assert "| pruning schedule | 3 steps" in text and "| feature distillation | weight 0.5" in text
    saved = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert not [k for k in saved["state_dict"] if "adapter" in k]
    convs = [n for n in onnx.load(str(tmp_path / "t" / "model.onnx")).graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(1 for n in card["channels"] if n != "fc"), "no adapter conv in the exported model"
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if "prune-step" in p.name) == []


@pytest.mark.slow
def test_an_interrupted_iterative_export_resumes_after_its_finished_steps(
    tiny,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = load_study_baseline(_study(tiny))
    settings = replace(QUICK, steps=6, prune_steps=3)
    real_train, calls, stop = iterative.train, [], ["prune step 2/3"]

    def stop_in_step_2(*args, **kwargs):
        calls.append(kwargs["description"])
        if any(s in kwargs["description"] for s in stop):
            raise Interrupted  # as if the machine stopped there
        return real_train(*args, **kwargs)

    monkeypatch.setattr(iterative, "train", stop_in_step_2)
    with pytest.raises(Interrupted):
        export_trial(base, 3, settings, tmp_path / "out", command="python cli.py export")
    partial = tmp_path / ".out.partial"
    recorded = json.loads((partial / iterative.SCHEDULE_FILE).read_text())
    assert [s["step"] for s in recorded["steps"]] == [1, 2] and recorded["steps"][0]["finished"]
    assert (partial / "prune-step-1.pt").exists()
    # Resumed with other settings, the weights would mix two recipes: refused in one line, nothing changed.
    others = [replace(settings, seed=1), replace(settings, prune_steps=1), replace(settings, feature_distill=1.0)]
    others += [replace(settings, lr=0.1), replace(settings, train_dtype="fp32"), replace(settings, distill=0.0)]
    others += [replace(settings, test_images=20)]  # each epoch's score, which picks the kept one, read on others
    for other in others:
        with pytest.raises(UsageError, match="resume it with the same settings"):
            export_trial(base, 3, other, tmp_path / "out", command="python cli.py export")
    # Another trial (or study) exported into the same folder would continue this one's weights.
    with pytest.raises(UsageError, match=r"started with trial 3 \(now 2\).*resume it with the same settings"):
        export_trial(base, 2, settings, tmp_path / "out", command="python cli.py export")
    assert json.loads((partial / iterative.SCHEDULE_FILE).read_text()) == recorded

    calls.clear()
    stop.clear()
    card = export_trial(base, 3, settings, tmp_path / "out", command="python cli.py export")
    assert calls == ["fine-tune trial 3, prune step 2/3"], "step 1 was not fine-tuned again"
    assert card["channels"] == layer_channels(rebuild_pruned(base, _study(tiny).trials[3]))
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the partial folder became the export"

    again = export_trial(base, 3, settings, tmp_path / "fresh", command="python cli.py export")
    assert again["accuracy"]["after_finetune"] == card["accuracy"]["after_finetune"], "resuming changed nothing"


@pytest.mark.slow
def test_bad_recovery_flags_are_one_line_errors(tiny) -> None:  # noqa: F811
    common = ["export", "--study", "tiny", "--studies-dir", tiny.studies_dir, "--trial", "3", "--epochs", "0.1"]
    for extra, words in [
        (["--prune-steps", "0"], "a positive whole number"),
        (["--prune-steps", "1000"], "more than the channels allow"),
        (["--feature-distill", "-1"], "a number >= 0"),
        (["--qat-epochs", "2"], "--qat-epochs goes with --quantization qat"),  # it would be ignored
    ]:
        bad = run_main(*common, *extra)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    unpruned = next(t.number for t in _study(tiny).trials if t.user_attrs.get("recipe") == "unpruned")
    bad = run_main(*common[:-4], "--trial", str(unpruned), "--prune-steps", "2")
    assert bad.returncode == 2 and "prunes nothing" in bad.stderr, bad.stderr


def test_a_study_without_its_space_refuses_steps_plainly() -> None:
    from types import SimpleNamespace

    with pytest.raises(UsageError, match="does not store its search space"):
        iterative.study_space(SimpleNamespace(study_name="old", user_attrs={}))


def test_the_default_feature_distillation_is_left_out_plainly_where_the_study_has_no_space() -> None:
    from types import SimpleNamespace

    from search.progress import NullReporter

    class Lines(NullReporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def info(self, message: str) -> None:
            self.lines.append(message)

    old = SimpleNamespace(study_name="old", user_attrs={})
    said = Lines()
    assert iterative.feature_weight(ExportSettings(), old, said) == 0.0
    assert said.lines == [
        "Feature distillation left out: the study did not store its search space (made before that was kept)"
    ]
    asked = ExportSettings(feature_distill=3.0, feature_distill_asked=True)  # the flag given: study_space refuses
    assert iterative.feature_weight(asked, old, Lines()) == 3.0
    stored = SimpleNamespace(study_name="new", user_attrs={"space": {"text": "stages: []"}})
    assert iterative.feature_weight(ExportSettings(), stored, said) == ExportSettings().feature_distill > 0


def test_steps_split_the_fine_tune_evenly() -> None:
    assert iterative.split_steps(10, 3) == [3, 3, 4] and sum(iterative.split_steps(7, 7)) == 7
    assert step_targets({"a": 64, "b": 32}, {"a": 32, "b": 32}, 4) == [{"a": 56}, {"a": 48}, {"a": 40}, {"a": 32}]


def test_the_card_says_feature_distillation_left_out_the_qat_steps() -> None:
    from search.shipping.recovery_card import recovery_rows

    distill = {"weight": 1.0, "stages": {"layer1": "layer1"}, "adapters": {"layer1": [32, 64]}}
    assert "FP32 fine-tune only" not in recovery_rows({"feature_distill": distill})[0]
    row = recovery_rows({"feature_distill": {**distill, "qat_steps_without": 120}})[0]
    assert "weight 1 on the stage outputs layer1" in row and "the last 120 steps, QAT, distil logits alone" in row
