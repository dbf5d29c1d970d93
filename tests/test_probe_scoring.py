"""The latency-aware tables' probes are scored by running the file that was timed in ONNX Runtime, and the
baseline's score on the probes' images comes from the study's evaluation of the baseline: the tables are the
same as PyTorch scoring gives, for less set-up time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.timing import LatencySettings
from search.models.build import build_model
from search.progress import RecordingReporter
from search.pruning.space import parse_space
from search.study import sensitivity
from search.study.uncertainty import accuracy_record
from search.training import evaluate
from search.training.evaluate import top1_correct

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

FAST = LatencySettings(threads=1, warmup=2, round_size=3, min_rounds=2, max_seconds=2)


@pytest.fixture()
def trained(trained_weights) -> torch.nn.Module:
    model = build_model("resnet18", 10)
    model.load_state_dict(torch.load(trained_weights, weights_only=True))
    return model.eval()


def _tables(trained: torch.nn.Module, data, record=None) -> sensitivity.SensitivityTable:
    space = parse_space(SPACE, "two stages").with_precisions(("fp32",))
    meter = CandidateMeter(trained, data, space=space, timer=LocalTimer(FAST))
    meter.baseline_ms = meter.time_baseline().median_ms
    return sensitivity.measure_sensitivity(
        space,
        trained,
        meter,
        baseline_accuracy=0.0,  # read again on the probes' images: limit below the split
        bn_batches=2,
        val_images=None,
        device="cpu",
        reporter=RecordingReporter(),
        baseline_record=record,
    )


def test_probes_are_scored_in_onnx_runtime_as_pytorch_scores_them(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensitivity, "PROBE_VAL_IMAGES", 120)  # below the split: the baseline is read again
    calls = {"onnx": 0, "torch": 0}
    real_onnx, real_torch = sensitivity.onnx_top1_correct, sensitivity.top1

    def counted_onnx(*args, **kwargs):
        calls["onnx"] += 1
        return real_onnx(*args, **kwargs)

    def counted_torch(*args, **kwargs):
        calls["torch"] += 1
        return real_torch(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "onnx_top1_correct", counted_onnx)
    monkeypatch.setattr(sensitivity, "top1", counted_torch)
    assert sensitivity.scores_in_onnx_runtime(CandidateMeter(trained, digits32, timer=LocalTimer(FAST)), "cpu")
    in_ort = _tables(trained, digits32)
    probes = sum(len(p) for p in in_ort.stages.values())
    assert calls == {"onnx": probes, "torch": 1}, "each probe scored in ONNX Runtime; the baseline read once"

    monkeypatch.setattr(sensitivity, "scores_in_onnx_runtime", lambda meter, device: False)
    in_torch = _tables(trained, digits32)
    assert in_torch.val_images == in_ort.val_images == 120
    assert in_torch.baseline_accuracy == in_ort.baseline_accuracy
    assert in_torch.stages.keys() == in_ort.stages.keys()
    for name in in_ort.stages:
        for a, b in zip(in_ort.stages[name], in_torch.stages[name], strict=True):
            assert a.level == b.level
            # the same recalibrated model on the same images: at most one image may round the other way
            assert abs(a.accuracy - b.accuracy) <= 1 / 120 + 1e-9, (name, a, b)
    drops = [p.accuracy for p in in_ort.stages["late"]]
    assert min(drops) < in_ort.baseline_accuracy, "the scores are of pruned models, not of the baseline"


def test_the_baseline_on_the_probes_images_is_the_start_of_the_studys_evaluation(trained, digits32) -> None:
    study_read = top1_correct(trained, digits32, "val", limit=200)  # the study's --val-images 200
    probes_read = top1_correct(trained, digits32, "val", limit=100)
    record = accuracy_record(study_read.tolist())
    np.testing.assert_array_equal(sensitivity.baseline_on_probe_images(record, 100), probes_read)
    assert sensitivity.baseline_on_probe_images(record, 300) is None, "the study read fewer images"
    whole = accuracy_record(top1_correct(trained, digits32, "val").tolist(), whole_split=True)
    assert sensitivity.baseline_on_probe_images(whole, 100) is None, "the whole split in its own order"
    assert sensitivity.baseline_on_probe_images(None, 100) is None


def test_tables_take_the_baselines_score_from_the_study_and_read_it_no_more(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensitivity, "PROBE_VAL_IMAGES", 100)
    reads = {"torch": 0}
    real_torch = sensitivity.top1

    def counted_torch(*args, **kwargs):
        reads["torch"] += 1
        return real_torch(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "top1", counted_torch)
    study_read = top1_correct(trained, digits32, "val", limit=200)
    table = _tables(trained, digits32, accuracy_record(study_read.tolist()))
    assert reads["torch"] == 0
    assert table.baseline_accuracy == pytest.approx(float(study_read[:100].mean()))
    assert table.baseline_accuracy == pytest.approx(evaluate.top1(trained, digits32, "val", limit=100))
