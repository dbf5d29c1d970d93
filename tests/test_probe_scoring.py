"""The latency-aware tables' probes are scored by running the file that was timed in ONNX Runtime, each read
until its drop is known well enough to rank, and the baseline's reads of the probes' images come from the
study's evaluation of the baseline: the tables are the same as PyTorch scoring gives, for less set-up time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search.data.spec import DataSpec
from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.onnx_export import export_onnx
from search.measuring.timing import LatencySettings
from search.models.build import build_model
from search.progress import RecordingReporter
from search.pruning.latency_aware import Probe
from search.pruning.space import parse_space
from search.study import sensitivity
from search.study.config import SearchConfig
from search.study.run import run_search
from search.study.uncertainty import accuracy_record
from search.training import evaluate
from search.training.evaluate import (
    onnx_correct_batches,
    onnx_top1_correct,
    read_top1_correct,
    top1_correct,
    top1_correct_batches,
)
from tests.test_latency_aware import SPACE

FAST = LatencySettings(threads=1, warmup=2, round_size=3, min_rounds=2, max_seconds=2)


def _count(monkeypatch: pytest.MonkeyPatch, module, name: str, counts: dict[str, int], key: str) -> None:
    """Replace ``module.name`` by a wrapper that adds one to ``counts[key]`` per call."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[key] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def _spy(monkeypatch: pytest.MonkeyPatch, module, name: str, seen) -> list:
    """Replace ``module.name`` by a wrapper that records ``seen(*args, **kwargs)`` of each call; the records."""
    real, records = getattr(module, name), []

    def spied(*args, **kwargs):
        records.append(seen(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return records


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
        bn_batches=2,
        val_images=None,
        device="cpu",
        reporter=RecordingReporter(),
        baseline_record=record,
    )


def test_probes_are_scored_in_onnx_runtime_as_pytorch_scores_them(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensitivity, "PROBE_VAL_IMAGES", 120)  # no study record given: the baseline is read once
    monkeypatch.setattr(sensitivity, "PROBE_MIN_IMAGES", 40)  # a clear drop could stop early (read_drop's test)
    calls = {"onnx": 0, "torch": 0, "baseline": 0}
    _count(monkeypatch, sensitivity, "onnx_correct_batches", calls, "onnx")
    _count(monkeypatch, sensitivity, "top1_correct_batches", calls, "torch")
    _count(monkeypatch, sensitivity, "top1_correct", calls, "baseline")
    assert sensitivity.scores_in_onnx_runtime(CandidateMeter(trained, digits32, timer=LocalTimer(FAST)), "cpu")
    monkeypatch.setattr(sensitivity, "scoring_engine", lambda meter, baseline, device, images, **k: ("onnxruntime", {}))
    in_ort = _tables(trained, digits32)
    probes = sum(len(p) for p in in_ort.stages.values())
    assert calls == {"onnx": probes, "torch": 0, "baseline": 1}, "probes run in ONNX Runtime; the baseline once"

    monkeypatch.setattr(sensitivity, "scoring_engine", lambda meter, baseline, device, images, **k: ("pytorch", {}))
    in_torch = _tables(trained, digits32)
    assert in_ort.scoring["engine"] == "onnxruntime" and in_torch.scoring["engine"] == "pytorch"
    assert in_torch.val_images == in_ort.val_images == 120
    assert in_torch.baseline_accuracy == in_ort.baseline_accuracy
    assert in_torch.stages.keys() == in_ort.stages.keys()
    for name in in_ort.stages:
        for a, b in zip(in_ort.stages[name], in_torch.stages[name], strict=True):
            assert a.level == b.level and a.images == b.images, (name, a, b)
            # the same recalibrated model on the same images: at most one image may round the other way
            assert abs(a.accuracy - b.accuracy) <= 1 / a.images + 1e-9, (name, a, b)
    every = [p for stage in in_ort.stages.values() for p in stage]
    assert min(p.accuracy for p in every) < in_ort.baseline_accuracy, "the scores are of pruned models"
    assert all(p.images is not None and 40 <= p.images <= 120 for p in every), every


def test_the_engine_that_scores_the_probes_is_the_cheaper_one_measured_here(trained, digits32) -> None:
    meter = CandidateMeter(trained, digits32, timer=LocalTimer(FAST))
    engine, costs = sensitivity.scoring_engine(meter, trained, "cpu", 200)
    assert set(costs) == {"onnxruntime", "pytorch"} and all(ms > 0 for ms in costs.values())
    assert engine == min(costs, key=costs.get)
    assert sensitivity.scoring_engine(meter, trained, "cuda") == ("pytorch", {}), "a GPU scores in PyTorch"
    table = sensitivity.SensitivityTable(1.0, 0.9, {}, scoring={"engine": engine, "ms_per_probe": costs})
    assert sensitivity.SensitivityTable.from_dict(table.to_dict()).scoring == table.scoring


def test_where_the_study_trains_in_bf16_the_probes_may_read_in_bf16_and_the_baseline_stays_fp32(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = CandidateMeter(trained, digits32, timer=LocalTimer(FAST))
    engine, costs = sensitivity.scoring_engine(meter, trained, "cpu", 200, bf16=True)
    assert set(costs) == {"onnxruntime", "pytorch", sensitivity.BF16_PROBES} and all(ms > 0 for ms in costs.values())
    assert engine in ("onnxruntime", "pytorch"), "the baseline's reported top-1 is never read in bf16"
    assert engine == min(("onnxruntime", "pytorch"), key=costs.get)

    cheap_bf16 = {"onnxruntime": 30.0, "pytorch": 20.0, sensitivity.BF16_PROBES: 10.0}
    monkeypatch.setattr(sensitivity, "scoring_engine", lambda *a, **k: ("pytorch", cheap_bf16))
    record = sensitivity.read_engine(meter, trained, "cpu", 200, bf16=True)
    assert record == {"engine": "pytorch", "ms_per_read": cheap_bf16, "images": 200, "probes": "pytorch-bf16"}
    line = sensitivity.engine_line(record)
    assert line == (
        "The baseline reads validation images in PyTorch (200 images: 0.0 s; ONNX Runtime 0.0 s;"
        " PyTorch under bf16 autocast 0.0 s); the tables' probes in PyTorch under bf16 autocast; trials in PyTorch"
    ), line
    monkeypatch.setattr(sensitivity, "supports_bf16", lambda: True)
    assert sensitivity.probes_engine(record, meter, "cpu") == sensitivity.BF16_PROBES
    monkeypatch.setattr(sensitivity, "supports_bf16", lambda: False)  # a worker on a CPU without native bf16
    assert sensitivity.probes_engine(record, meter, "cpu") == "pytorch"
    assert sensitivity.probes_engine({"engine": "onnxruntime"}, meter, "cuda") == "pytorch"


def test_bf16_probes_give_the_fp32_tables_within_rounding_and_pair_with_a_bf16_read_of_the_baseline(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensitivity, "PROBE_VAL_IMAGES", 120)
    monkeypatch.setattr(sensitivity, "supports_bf16", lambda: True)
    space = parse_space(SPACE, "two stages").with_precisions(("fp32",))
    meter = CandidateMeter(trained, digits32, space=space, timer=LocalTimer(FAST))
    meter.baseline_ms = meter.time_baseline().median_ms
    record = accuracy_record(top1_correct(trained, digits32, "val", limit=200).tolist())  # the study's FP32 read
    autocasts = _spy(monkeypatch, sensitivity, "top1_correct", lambda *a, **k: k.get("autocast"))
    recalibrated_in_bf16 = _spy(
        monkeypatch, sensitivity, "recalibrate_batchnorm", lambda *a, **k: torch.is_autocast_enabled("cpu")
    )

    def tables(engine: dict) -> sensitivity.SensitivityTable:
        return sensitivity.measure_sensitivity(
            space, trained, meter, bn_batches=2, val_images=None, device="cpu", reporter=RecordingReporter(),
            baseline_record=record, engine=engine,
        )  # fmt: skip

    fp32 = tables({"engine": "pytorch"})
    assert autocasts == [], "FP32 probes pair with the study's own read of the baseline"
    assert recalibrated_in_bf16 and not any(recalibrated_in_bf16)
    recalibrated_in_bf16.clear()
    bf16 = tables({"engine": "pytorch", "probes": sensitivity.BF16_PROBES})
    assert autocasts == [torch.bfloat16], "bf16 probes pair with one bf16 read of the baseline on their images"
    assert recalibrated_in_bf16 and all(recalibrated_in_bf16), "and recalibrate their BatchNorms in bf16"
    assert bf16.scoring["probes"] == sensitivity.BF16_PROBES
    assert sensitivity.scored_in(bf16) == ", in PyTorch under bf16 autocast"
    # a small model near chance on digits: bf16 flips a few of its close calls (the benchmark measures real ones)
    assert abs(bf16.baseline_accuracy - fp32.baseline_accuracy) <= 3 / 120 + 1e-9
    for name in fp32.stages:
        for a, b in zip(fp32.stages[name], bf16.stages[name], strict=True):
            assert a.level == b.level and a.latency_ms > 0 and b.latency_ms > 0
            drop_a, drop_b = fp32.baseline_accuracy - a.accuracy, bf16.baseline_accuracy - b.accuracy
            assert abs(drop_a - drop_b) <= 6 / 120 + 1e-9, (name, drop_a, drop_b)


def test_stored_tables_are_read_by_this_version_whatever_version_wrote_them() -> None:
    probes = {"a": (Probe(0.5, 8.0, 0.85, 384), Probe(1.0, 6.0, 0.7))}
    stored = sensitivity.SensitivityTable(10.0, 0.9, probes, val_images=1000).to_dict()
    assert stored["stages"]["a"][1] == {"level": 1.0, "latency_ms": 6.0, "accuracy": 0.7}, "as older tables were"
    assert sensitivity.SensitivityTable.from_dict(stored).stages == probes
    stored["stages"]["a"][0]["added_later"] = 1  # a field of a later version: read without it
    assert sensitivity.SensitivityTable.from_dict(stored).stages == probes


def test_the_batches_a_probe_reads_are_the_images_and_order_of_a_whole_read(trained, digits32) -> None:
    """The pairing with the baseline rests on this: batch by batch, the same images in the same order."""
    for limit in (100, None):
        whole = top1_correct(trained, digits32, "val", limit=limit)
        joined = np.concatenate(list(top1_correct_batches(trained, digits32, "val", limit=limit)))
        np.testing.assert_array_equal(joined, whole)
        onnx_model = export_onnx(trained, digits32.example_input())
        np.testing.assert_array_equal(
            np.concatenate(list(onnx_correct_batches(onnx_model, digits32, "val", limit=limit))),
            onnx_top1_correct(onnx_model, digits32, "val", limit=limit),
        )
    served = torch.cat([y for _, y in digits32.batches("val", 64, shuffle=True, augment=False, limit=150)])
    assert torch.equal(served, digits32.val.labels[digits32.shuffled_order("val", 150)])


def test_the_baseline_on_the_probes_images_comes_from_any_read_that_covered_them(trained, digits32) -> None:
    split = len(digits32.val)
    probes_read = top1_correct(trained, digits32, "val", limit=100)  # the probes' first 100 shuffled images
    subset = accuracy_record(top1_correct(trained, digits32, "val", limit=200).tolist())  # --val-images 200
    np.testing.assert_array_equal(sensitivity.baseline_on_probe_images(subset, digits32, 100), probes_read)
    assert sensitivity.baseline_on_probe_images(subset, digits32, 300) is None, "the study read fewer images"

    in_order = top1_correct(trained, digits32, "val")  # the whole split in its own order, marked so
    whole = accuracy_record(in_order.tolist(), whole_split=True)
    np.testing.assert_array_equal(sensitivity.baseline_on_probe_images(whole, digits32, 100), probes_read)
    np.testing.assert_array_equal(sensitivity.baseline_on_probe_images(whole, digits32, split), in_order)
    if not np.array_equal(in_order[:100], probes_read):  # the test can fail: taking its head would be wrong
        assert not np.array_equal(sensitivity.baseline_on_probe_images(whole, digits32, 100), in_order[:100])

    unmarked = accuracy_record(in_order.tolist())  # older studies: the whole split, in an order not recorded
    assert sensitivity.baseline_on_probe_images(unmarked, digits32, 100) is None
    assert sensitivity.baseline_on_probe_images(None, digits32, 100) is None


def test_tables_take_the_baselines_score_from_the_study_and_read_it_no_more(
    trained, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensitivity, "PROBE_VAL_IMAGES", 100)
    reads = {"torch": 0}
    _count(monkeypatch, sensitivity, "top1_correct", reads, "torch")
    study_read = top1_correct(trained, digits32, "val", limit=200)
    table = _tables(trained, digits32, accuracy_record(study_read.tolist()))
    assert reads["torch"] == 0
    assert table.baseline_accuracy == pytest.approx(float(study_read[:100].mean()))
    assert table.baseline_accuracy == pytest.approx(evaluate.top1(trained, digits32, "val", limit=100))


def _stream(correct: np.ndarray, batch: int, consumed: list[int]):
    try:
        for start in range(0, len(correct), batch):
            consumed.append(start)
            yield correct[start : start + batch]
    finally:
        consumed.append(-1)  # closed


def test_a_clear_drop_stops_reading_early_and_a_small_one_reads_every_image() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.random(1000) < 0.9  # 90% right
    collapsed = baseline & (rng.random(1000) < 0.5)  # loses half of them: about 45 pp
    consumed: list[int] = []
    drop, images = sensitivity.read_drop(_stream(collapsed, 64, consumed), baseline)
    assert images == 256, "the first batch past PROBE_MIN_IMAGES (250) already knows a 45 pp drop to 10%"
    assert consumed[-1] == -1 and len(consumed) == 5, "the stream was closed, no further batch read"
    assert drop == pytest.approx(float(baseline[:256].mean() - collapsed[:256].mean()))
    assert 0.35 < drop < 0.55

    slight = baseline & (rng.random(1000) < 0.99)  # about 1 pp: the drop's error exceeds 10% of it to the end
    drop, images = sensitivity.read_drop(_stream(slight, 64, []), baseline)
    assert images == 1000 and drop == pytest.approx(float(baseline.mean() - slight.mean()))

    better = baseline | (rng.random(1000) < 0.5)  # a probe better than the baseline reads every image too
    drop, images = sensitivity.read_drop(_stream(better, 64, []), baseline)
    assert images == 1000 and drop < 0

    plain = [collapsed[i : i + 64] for i in range(0, 1000, 64)]  # a list of batches, nothing to close
    assert sensitivity.read_drop(plain, baseline)[1] == 256
    assert sensitivity.read_drop(plain, baseline, min_images=1000)[1] == 1000, "the whole split in its own order"

    longer = np.concatenate([collapsed, collapsed])  # a stream longer than the baseline's reads stops at its end
    _, images = sensitivity.read_drop(_stream(longer, 300, []), baseline[:200])
    assert images == 200


def test_both_engines_read_the_same_images_alike(trained, digits32) -> None:
    in_torch = read_top1_correct(trained, digits32, "val", limit=200, engine="pytorch")
    in_onnx = read_top1_correct(trained, digits32, "val", limit=200, engine="onnxruntime")
    assert len(in_torch) == len(in_onnx) == 200
    assert int((in_torch != in_onnx).sum()) <= 1, "the same FP32 model: at most one image rounds the other way"


@pytest.mark.slow
def test_a_study_reads_its_baseline_and_probes_with_the_engine_it_chose_and_its_trials_in_pytorch(
    tmp_path, trained_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline and the probes read in the engine the study chose at creation (here forced to ONNX Runtime),
    which the study records and the creation log names; the trials read in PyTorch."""
    costs = {"onnxruntime": 10.0, "pytorch": 20.0}
    monkeypatch.setattr(sensitivity, "scoring_engine", lambda *a, **k: ("onnxruntime", costs))
    reads = {"onnxruntime": 0}
    _count(monkeypatch, evaluate, "onnx_top1_correct", reads, "onnxruntime")
    space = tmp_path / "tiny.toml"
    space.write_text(SPACE)
    config = SearchConfig(
        budget_fraction=0.6,
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=32),
        space=str(space),
        study="engine",
        trials=3,
        finetune_steps=2,
        bn_batches=2,
        val_images=64,
        precisions=("fp32",),
        studies_dir=str(tmp_path / "studies"),
    )
    reporter = RecordingReporter()
    study = run_search(config, reporter).study
    assert study.user_attrs["read_engine"] == {"engine": "onnxruntime", "ms_per_read": costs, "images": 64}
    assert study.user_attrs["latency_aware"]["scoring"]["engine"] == "onnxruntime"
    line = "The baseline and the tables read validation images in ONNX Runtime (64 images: 0.0 s; PyTorch 0.0 s);"
    line += " trials in PyTorch"
    assert line in reporter.infos, reporter.infos
    assert reads["onnxruntime"] == 1, "the baseline, once; the trials read in PyTorch"
    record = study.user_attrs["baseline_accuracy_record"]
    assert record["images"] == 64 and study.user_attrs["baseline_accuracy"] == record["correct"] / 64
    tuned = [t for t in study.trials if t.user_attrs.get("fine_tuned")]
    assert tuned and all(t.user_attrs["accuracy_record"]["images"] == 64 for t in tuned)
