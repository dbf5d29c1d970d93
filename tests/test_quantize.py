"""INT8: real ONNX Runtime static quantization, accuracy measured in ONNX Runtime, and the INT8 search path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import torch

from search.data.spec import DataSpec
from search.errors import UsageError
from search.measuring import int8_check
from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.int8_check import choose_precisions
from search.measuring.onnx_export import export_onnx, fix_batch
from search.measuring.quantize import QuantizedModel, QuantizeSettings, calibration_batches, quantize_model
from search.measuring.timing import LatencySettings, open_session
from search.models.build import build_model
from search.progress import RecordingReporter
from search.pruning.policy import Policy, StagePolicy
from search.pruning.space import SPACES_DIR, load_space
from search.study.config import SearchConfig
from search.study.front import rows
from search.study.run import run_search
from search.study.uncertainty import unpack_correct
from search.training.evaluate import compare_top1, onnx_top1, onnx_top1_correct, top1, top1_correct

FAST = LatencySettings(threads=1, warmup=3, round_size=5, min_rounds=2, max_seconds=5)
SMALL = QuantizeSettings(calibration_images=64)


@pytest.fixture(scope="module")
def trained(trained_weights: Path) -> torch.nn.Module:
    model = build_model("resnet18", 10)
    model.load_state_dict(torch.load(trained_weights, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def quantized(trained: torch.nn.Module, digits32) -> QuantizedModel:
    return quantize_model(trained, digits32, SMALL)


def test_policy_precision_round_trips_and_old_policies_load_as_fp32() -> None:
    stages = {"layer1": StagePolicy(stream=0.25, inner=0.5, criterion="l2")}
    int8 = Policy(stages=stages, round_to=16, seed=3, precision="int8")
    assert Policy.from_json(int8.to_json()) == int8
    assert json.loads(int8.to_json())["precision"] == "int8"
    assert int8.describe().endswith(", int8") and Policy(stages={}, precision="int8").describe() == "unpruned, int8"

    fp32 = replace(int8, precision="fp32")
    old = fp32.to_dict()
    del old["precision"]  # a policy stored before precision existed
    assert Policy.from_dict(old) == fp32
    assert fp32.key() != int8.key()
    with pytest.raises(ValueError, match="precision"):
        Policy(stages=stages, precision="fp16")


def test_space_suggests_precision_only_when_there_is_a_choice(tmp_path: Path) -> None:
    space = load_space(SPACES_DIR / "resnet18.toml")
    assert space.precisions == ("fp32", "int8")
    policy = replace(space.uniform(0.35), precision="int8")
    params = space.params_for(policy)
    assert params["precision"] == "int8"
    assert space.suggest(optuna.trial.FixedTrial(params)) == policy
    assert space.unpruned("int8").precision == "int8" and space.unpruned().precision == "fp32"

    fp32_only = space.with_precisions(("fp32",))
    assert "precision" not in fp32_only.params_for(fp32_only.uniform(0.35))
    assert fp32_only.suggest(optuna.trial.FixedTrial(fp32_only.params_for(fp32_only.uniform(0.35)))).precision == "fp32"
    int8_only = space.with_precisions(("int8",))
    assert int8_only.suggest(optuna.trial.FixedTrial(int8_only.params_for(int8_only.unpruned()))).precision == "int8"

    text = (SPACES_DIR / "resnet18.toml").read_text()
    narrow = tmp_path / "fp32.toml"
    narrow.write_text('precision = ["fp32"]\n' + text)
    with pytest.raises(UsageError, match="--precision") as err:
        load_space(narrow).with_precisions(("int8",))
    assert "\n" not in str(err.value)
    (tmp_path / "bad.toml").write_text('precision = ["fp16"]\n' + text)
    with pytest.raises(UsageError, match="precision"):
        load_space(tmp_path / "bad.toml")


@pytest.mark.slow
def test_quantized_model_is_qdq_per_channel_and_agrees_with_fp32(
    quantized: QuantizedModel, digits32, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = onnx.load_from_string(quantized.int8_onnx).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    inits = {i.name: i for i in graph.initializer}
    weight_scales = [
        inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
    ]
    assert any(len(onnx.numpy_helper.to_array(s).shape) == 1 and s.dims[0] > 1 for s in weight_scales), "per-channel"
    assert len(quantized.int8_onnx) < 0.5 * len(quantized.fp32_onnx), "INT8 weights take a quarter of the bytes"

    x = next(iter(calibration_batches(digits32, SMALL)))
    fp32 = open_session(quantized.fp32_onnx, 1).run(None, {"input": x})[0]
    int8 = open_session(quantized.int8_onnx, 1).run(None, {"input": x})[0]
    assert np.abs(int8 - fp32).mean() < 0.1 * np.abs(fp32).mean() + 1e-3
    agreement = compare_top1(quantized.fp32_onnx, quantized.int8_onnx, digits32, "val")
    assert agreement.images == len(digits32.val)
    assert agreement.agreement >= 0.85
    assert abs(agreement.top1_a - agreement.top1_b) <= 0.08
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", "the quantizer's own prints are silenced"


@pytest.mark.slow
def test_onnx_runtime_top1_matches_pytorch_top1(trained: torch.nn.Module, quantized, digits32) -> None:
    expected = top1(trained, digits32, "val")
    assert onnx_top1(quantized.fp32_onnx, digits32, "val") == pytest.approx(expected, abs=2 / len(digits32.val))
    static = export_onnx(trained, digits32.example_input())  # a batch-1 model is fed one image at a time
    assert onnx_top1(static, digits32, "val", limit=40) == pytest.approx(top1(trained, digits32, "val", limit=40))
    # Per image, in the same fixed order: the record a trial keeps for paired comparisons.
    torch_correct = top1_correct(trained, digits32, "val", limit=40)
    onnx_correct = onnx_top1_correct(static, digits32, "val", limit=40)
    assert len(torch_correct) == len(onnx_correct) == 40
    assert torch_correct.mean() == pytest.approx(top1(trained, digits32, "val", limit=40))
    assert (torch_correct == onnx_correct).mean() >= 0.95, "the same images, in the same order"


def test_fix_batch_turns_a_dynamic_batch_into_batch_one(quantized: QuantizedModel) -> None:
    fixed = fix_batch(quantized.int8_onnx, 1)
    dim = onnx.load_from_string(fixed).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1
    assert open_session(fixed, 1).run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


@pytest.mark.slow
def test_int8_is_timed_against_fp32_and_dropped_with_one_warning_where_not_faster(
    trained: torch.nn.Module, digits32, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = export_onnx(trained, digits32.example_input())
    meter = CandidateMeter(trained, digits32, timer=LocalTimer(FAST), quantize=SMALL, baseline_onnx=fp32)
    check = int8_check.check_int8(meter)  # quantized and timed for real
    assert check.available and check.ratio is not None and 0.05 < check.ratio < 20
    assert check.int8_median_ms is not None and check.fp32_median_ms is not None
    assert check.to_dict()["faster"] == (check.ratio <= int8_check.MAX_INT8_RATIO)

    monkeypatch.setattr(int8_check, "check_int8", lambda *args: check)
    monkeypatch.setattr(int8_check, "MAX_INT8_RATIO", 0.0)  # as on a CPU where INT8 gains nothing
    reporter = RecordingReporter()
    kept, seen = choose_precisions(("fp32", "int8"), meter, reporter)
    assert kept == ("fp32",) and seen is check and not check.faster
    assert len(reporter.warnings) == 1 and "INT8 is not searched" in reporter.warnings[0]
    with pytest.raises(UsageError, match="--precision fp32"):
        choose_precisions(("int8",), meter, RecordingReporter())
    assert choose_precisions(("fp32",), meter, reporter) == (("fp32",), None)

    monkeypatch.setattr(int8_check, "MAX_INT8_RATIO", 100.0)
    assert choose_precisions(("fp32", "int8"), meter, reporter)[0] == ("fp32", "int8")
    assert len(reporter.warnings) == 1 and any("INT8 baseline" in line for line in reporter.infos)


@pytest.mark.slow
def test_search_with_int8_records_the_quantized_candidates(
    tmp_path: Path, trained_weights: Path, monkeypatch: pytest.MonkeyPatch, digits32
) -> None:
    monkeypatch.setattr(int8_check, "MAX_INT8_RATIO", 100.0)  # search INT8 whatever this CPU gains from it
    space = tmp_path / "space.toml"
    text = (SPACES_DIR / "resnet18.toml").read_text().replace("[0.2, 0.35, 0.5]", "[0.5]")
    space.write_text(text.replace("round_to = [8, 16]", "round_to = [8]"))  # fewer fastest-policy measurements
    config = SearchConfig(
        budget_ms=1e6,
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=32),
        space=str(space),
        study="int8",
        trials=3,
        finetune_steps=2,
        bn_batches=2,
        calibration_images=64,
        studies_dir=str(tmp_path / "studies"),
    )
    study = run_search(config).study
    assert study.user_attrs["precisions"] == ["fp32", "int8"]
    assert study.user_attrs["int8_check"]["available"] is True
    assert study.user_attrs["settings"]["calibration_method"] == "minmax"
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.user_attrs.get("recipe") for t in done] == ["unpruned", "uniform 0.5 l1", "unpruned int8"]

    just_quantized = done[2].user_attrs
    assert just_quantized["precision"] == "int8" and just_quantized["policy"]["precision"] == "int8"
    assert just_quantized["latency"]["precision"] == "int8"
    assert just_quantized["fine_tuned"] is False and "reused_from_trial" not in just_quantized["latency"]
    assert just_quantized["quantization"]["calibration_images"] == 64
    assert just_quantized["quantization"]["evaluated_in"] == "onnxruntime"
    assert "quantize" in just_quantized["seconds"]
    assert 0.5 < done[2].values[0] <= 1.0, "the quantized baseline's own top-1, run in ONNX Runtime"

    # A pruned INT8 policy within the budget: fine-tuned in FP32, quantized, scored in ONNX Runtime.
    loaded = load_space(space).with_precisions(study.user_attrs["precisions"])
    study.enqueue_trial(loaded.params_for(loaded.uniform(0.5, precision="int8")))
    study = run_search(replace(config, trials=4)).study
    pruned = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[3]
    attrs = pruned.user_attrs
    assert attrs["precision"] == "int8" and attrs["fine_tuned"] is True
    assert attrs["channels"] == done[1].user_attrs["channels"]
    assert "reused_from_trial" not in attrs["latency"], "the FP32 measurement of the same channels is not reused"
    assert {"accuracy_before", "accuracy_fp32", "quantization"} <= set(attrs)
    assert {"quantize", "finetune", "evaluate"} <= set(attrs["seconds"])
    assert pruned.values[0] == attrs["accuracy"] and abs(attrs["accuracy"] - attrs["accuracy_fp32"]) < 0.15

    # Each accuracy carries its record: images read, Wilson interval, and which images it got right (the
    # INT8 model's in ONNX Runtime for int8, the objective; the baseline's from study creation for the unpruned FP32).
    images = len(digits32.val) if config.val_images is None else min(len(digits32.val), config.val_images)
    record = attrs["accuracy_record"]
    assert record["images"] == images and record["interval"][0] <= attrs["accuracy"] <= record["interval"][1]
    assert sum(unpack_correct(record["per_image"], images)) / images == pytest.approx(attrs["accuracy"])
    fp32 = done[1].user_attrs["accuracy_record"]
    assert sum(unpack_correct(fp32["per_image"], images)) / images == pytest.approx(done[1].values[0])
    baseline = done[0].user_attrs["accuracy_record"]  # read when the study was created, on the same images
    assert baseline == study.user_attrs["baseline_accuracy_record"] and baseline["images"] == images
    assert sum(unpack_correct(baseline["per_image"], images)) / images == pytest.approx(done[0].values[0])
    by_number = {r.number: r for r in rows(study)}
    assert by_number[2].precision == "int8" and by_number[2].accuracy is not None
    assert by_number[3].images == images and by_number[3].interval is not None
    assert by_number[3].to_dict()["precision"] == "int8"


def test_precision_flag_parses_a_comma_list_in_one_order() -> None:
    from search.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["search", "--budget-ms", "5", "--precision", "int8, fp32"])
    assert args.precision == ("fp32", "int8")
    assert parser.parse_args(["search", "--budget-ms", "5"]).precision == SearchConfig(budget_ms=5).precisions
    assert parser.parse_args(["search", "--budget-ms", "5", "--calibration-method", "entropy"]).calibration_method
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--budget-ms", "5", "--precision", "fp16"])
