"""``--device``: where training and evaluation run, what is refused, and what a study records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

from search.data.spec import DataSpec
from search.errors import UsageError
from search.models.build import build_model
from search.shipping.export import export_trial
from search.shipping.rebuild import load_study_baseline
from search.shipping.settings import ExportSettings
from search.study.config import SearchConfig
from search.study.run import run_search
from search.study.workers import plan_devices, worker_argv
from search.training.device import loader_plan, precision, resolve
from search.training.evaluate import top1
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train
from tests.conftest import run_main

NO_CUDA = "no CUDA device on this machine: the CUDA paths are checked where there is one"


def _pretend_gpus(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpus(monkeypatch, 0)
    with pytest.raises(UsageError, match=r"--device cuda: PyTorch sees no CUDA device.*--device cpu"):
        resolve("cuda")
    assert resolve("auto") == torch.device("cpu"), "auto falls back to the CPU"
    assert resolve(" CPU ") == torch.device("cpu")


def test_a_gpu_number_out_of_range_names_the_ones_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpus(monkeypatch, 2)
    with pytest.raises(UsageError, match=r"--device cuda:7: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve("cuda:7")
    assert resolve("cuda:1") == torch.device("cuda", 1)
    assert resolve("auto") == torch.device("cuda", 0), "auto takes the GPU when there is one"


def test_a_malformed_device_is_refused_by_the_command_line() -> None:
    done = run_main("search", "--budget-ms", "30", "--device", "gpu0")
    assert done.returncode == 2
    assert "must be auto, cpu, cuda or cuda:N, got 'gpu0'" in done.stderr and "Traceback" not in done.stderr


def test_mixed_precision_follows_what_the_device_computes_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpus(monkeypatch, 1, bf16=False)
    older = precision(torch.device("cuda", 0), "auto")
    assert (older.name, older.scale_loss) == ("fp16", True), "fp16 needs its losses scaled"
    _pretend_gpus(monkeypatch, 1, bf16=True)
    assert precision(torch.device("cuda", 0), "auto").name == "bf16"
    assert precision(torch.device("cuda", 0), "fp32").dtype is None
    with pytest.raises(UsageError, match="fp16 training needs a CUDA device"):
        precision(torch.device("cpu"), "fp16")


def test_fp16_without_a_gpu_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpus(monkeypatch, 0)
    with pytest.raises(UsageError, match="fp16 training needs a CUDA device"):
        run_search(SearchConfig(budget_ms=30, data=DataSpec("imagefolder:/nowhere"), train_dtype="fp16"))


def test_loaders_feed_a_gpu_from_spare_cores_and_leave_a_cpu_trainer_its_cores() -> None:
    assert loader_plan(torch.device("cuda", 0), cpus=16) == (8, True)
    assert loader_plan(torch.device("cuda", 0), cpus=2) == (1, True)
    assert loader_plan(torch.device("cpu"), cpus=2) == (0, False)
    assert loader_plan(torch.device("cpu"), cpus=16) == (4, False)


def test_each_local_worker_gets_its_own_gpu() -> None:
    assert plan_devices("auto", 3, cuda_devices=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert plan_devices("cuda", 2, cuda_devices=4) == ["cuda:0", "cuda:1"]
    assert plan_devices("cpu", 2, cuda_devices=4) == [None, None], "--device cpu stays as it is"
    assert plan_devices("auto", 2, cuda_devices=0) == [None, None]
    argv = ["search", "--budget-ms", "30", "--device", "auto", "--workers", "2"]
    assert worker_argv(argv, (2, 3), "cuda:1") == ["search", "--budget-ms", "30", "--cpus", "2,3", "--device", "cuda:1"]
    assert worker_argv(argv, (0,))[-4:] == ["--device", "auto", "--cpus", "0"]


def test_training_and_evaluation_take_a_device_and_hand_the_model_back_on_the_cpu(digits32) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", digits32.num_classes)
    teacher = build_model("resnet18", digits32.num_classes)
    settings = TrainSettings(steps=2, batch_size=8, distill=0.5, train_dtype="fp32", device="cpu")
    result = train(model, digits32, settings, teacher=teacher)
    recalibrate_batchnorm(model, digits32, batches=1, batch_size=8, device="cpu")
    assert result.steps == 2 and 0.0 <= top1(model, digits32, limit=32, device="cpu") <= 1.0
    assert all(p.device.type == "cpu" for p in [*model.parameters(), *teacher.parameters()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_fine_tuning_on_a_gpu_matches_the_cpu_closely(digits32) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", digits32.num_classes)
    recalibrate_batchnorm(model, digits32, batches=2, batch_size=16, device="cuda")
    on_gpu = top1(model, digits32, limit=128, device="cuda")
    on_cpu = top1(model, digits32, limit=128, device="cpu")
    assert abs(on_gpu - on_cpu) <= 0.02
    result = train(model, digits32, TrainSettings(steps=5, batch_size=16, device="cuda"))
    assert result.steps == 5 and next(model.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_the_study_and_its_trials_record_the_device_and_a_resume_on_another_kind_is_refused(
    tmp_path: Path, trained_weights: Path
) -> None:
    config = SearchConfig(
        budget_ms=1e6,
        model="resnet18",
        weights=str(trained_weights),
        data=DataSpec("digits", input_size=16),
        study="devices",
        trials=1,
        finetune_steps=1,
        bn_batches=1,
        val_images=32,
        precisions=("fp32",),
        device="cpu",
        studies_dir=str(tmp_path / "studies"),
    )
    study = run_search(config).study
    assert study.user_attrs["train_device"]["kind"] == "cpu" and study.user_attrs["train_device"]["name"]
    here = study.user_attrs["train_device"]["precision"]  # auto: bf16 on CPUs that have it, else fp32
    assert here == precision(torch.device("cpu"), config.train_dtype).name
    assert study.user_attrs["augmentation"]["train"].startswith("random crop 16 with reflect padding 2")
    assert study.trials[0].user_attrs["train_device"] == study.user_attrs["train_device"]
    base = load_study_baseline(study)
    out = tmp_path / "export"
    card = export_trial(base, 0, ExportSettings(steps=1, device="cpu", test_images=32), out, command="test")
    assert card["train_device"]["kind"] == "cpu" and card["augmentation"] == study.user_attrs["augmentation"]
    assert (
        "fine-tuned on " in (out / "card.md").read_text()
        and "evaluated on the whole image" in (out / "card.md").read_text()
    )
    study.set_user_attr("train_device", {"kind": "cuda", "device": "cuda:0", "name": "NVIDIA H100"})
    with pytest.raises(UsageError, match=r"fine-tunes on cuda \(NVIDIA H100\), this run on cpu.*--allow-mixed-devices"):
        run_search(config)
    resumed = run_search(replace(config, allow_mixed_devices=True))
    finished = optuna.load_study(study_name="devices", storage=config.storage_url).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,)
    )
    assert resumed.ran == 0 and len(finished) == 1, "allowed, it resumes (and the study already has its trial)"
    other = "bf16" if here == "fp32" else "fp32"  # made with another --train-dtype
    study.set_user_attr("train_device", {"kind": "cpu", "device": "cpu", "name": "a CPU", "precision": other})
    with pytest.raises(UsageError, match=rf"fine-tunes in {other}, this run in {here}.*--train-dtype {other}"):
        run_search(config)
