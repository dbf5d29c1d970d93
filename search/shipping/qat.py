"""Quantization-aware training for an INT8 export (``export --quantization qat``).

The last ``--qat-epochs`` of the fine-tune (all of it when it is shorter) train the model with fake
quantization that computes what ONNX Runtime's INT8 model computes (:mod:`search.training.fake_quant`):
the same per-channel symmetric INT8 weights (7 bits where the search's ``reduce_range`` says so), the
same UINT8 activations at the same places, initial ranges from the same calibration images. BatchNorm
statistics are frozen for the QAT steps (the pruned model's were re-estimated and fine-tuned before),
so the folded weights the model trains are the ones that ship. The QAT-trained FP32 weights are then
written to ``model.onnx`` and quantized by ONNX Runtime exactly as PTQ does (same calibration, whose
MinMax ranges the fake-quantized model takes too), and the INT8 model must predict what the
fake-quantized PyTorch model predicts on at least ``min_qat_agreement`` of the test images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.quantize import QuantizeSettings, calibration_batches
from search.measuring.runtimes.registry import study_runtime
from search.measuring.timing import open_session
from search.progress import Reporter
from search.pruning.policy import Policy
from search.shipping.checks import CheckFailed
from search.shipping.settings import QUANTIZATION_MODES, ExportSettings
from search.training.device import resolve
from search.training.fake_quant import calibrate, copy_back, follow_ranges, freeze, prepare_qat, shared_names
from search.training.finetune import TrainSettings, train

__all__ = [
    "QAT_LR_FACTOR",
    "QatResult",
    "check_against_fake_quant",
    "check_quantization",
    "fake_quant_agreement",
    "qat_finetune",
    "split_steps",
]

QAT_LR_FACTOR = 0.1
"""The QAT steps' peak learning rate is this fraction of ``--lr`` (they start from fine-tuned weights)."""


@dataclass
class QatResult:
    model: nn.Module
    """The fake-quantized model (eval mode, on the CPU), calibrated like the shipped INT8 model."""
    record: dict[str, Any]
    """What the card says about the QAT steps."""


def check_quantization(study: optuna.Study, number: int, settings: ExportSettings) -> None:
    """Refuse, in one line and before any work, a quantization mode the trial cannot take."""
    if settings.quantization not in QUANTIZATION_MODES:
        modes = ", ".join(QUANTIZATION_MODES)
        raise UsageError(f"--quantization must be one of {modes}, got {settings.quantization!r}")
    if settings.quantization != "qat":
        return
    trial = study.trials[number]
    if trial.user_attrs.get("precision") != "int8":
        raise UsageError(
            f"trial {number} is an FP32 policy and --quantization qat trains for INT8 only; "
            "pass --quantization ptq (the default) or export an INT8 trial"
        )
    unpruned = Policy.from_dict(trial.user_attrs["policy"]).is_unpruned
    if unpruned and not settings.finetune_unpruned:
        raise UsageError(
            f"trial {number} prunes nothing, so it is not fine-tuned and QAT has nothing to train; "
            "pass --finetune-unpruned or --quantization ptq"
        )
    if settings.epochs == 0 and not settings.steps:
        raise UsageError("--quantization qat trains during the fine-tune, but --epochs is 0; pass --epochs > 0")
    method = QuantizeSettings.from_dict(trial.user_attrs.get("quantization", {})).calibration_method
    if method != "minmax":
        raise UsageError(
            f"trial {number}'s INT8 model is calibrated with {method}, and QAT trains against MinMax ranges, so "
            "the shipped model would not be the one trained; pass --quantization ptq, or search with "
            "--calibration-method minmax"
        )
    if study_runtime(study) == "executorch":
        raise UsageError(
            "--quantization qat ships QAT weights in the INT8 ONNX model, but an ExecuTorch study ships "
            "model.int8.pte, which XNNPACK quantizes post-training; pass --quantization ptq"
        )


def split_steps(settings: ExportSettings, steps_per_epoch: int) -> tuple[ExportSettings, int]:
    """The settings of the FP32 fine-tune before QAT, and the number of QAT steps (total unchanged; 0 for PTQ)."""
    if settings.quantization != "qat":
        return settings, 0
    if settings.steps is not None:
        total = settings.steps
        share = min(1.0, settings.qat_epochs / settings.epochs) if settings.epochs else 1.0
        qat = min(total, max(1, math.ceil(total * share)))
    else:
        total = max(1, round(settings.epochs * steps_per_epoch))
        qat = min(total, max(1, round(settings.qat_epochs * steps_per_epoch)))
    fp32_epochs = max(0.0, settings.epochs - settings.qat_epochs)
    return replace(settings, epochs=fp32_epochs, steps=total - qat), qat


def qat_finetune(
    model: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    settings: ExportSettings,
    quantize: QuantizeSettings,
    steps: int,
    reporter: Reporter,
    description: str,
    checkpoint: Path | None = None,
) -> QatResult:
    """Train ``model`` (in place: its FP32 weights end QAT-trained) with fake quantization for ``steps`` steps.

    With ``checkpoint``, the fake-quantized model (its weights and its ranges), the optimizer and the
    schedule are saved at the end of every epoch and after the last step, and a call after an
    interruption resumes from there: the model is prepared and calibrated as before, then takes the saved state.
    """
    started = time.perf_counter()
    try:
        prepared = prepare_qat(model, data.example_input(), reduce_range=bool(quantize.reduce_range))
    except ValueError as exc:
        raise UsageError(f"{exc}; export it with --quantization ptq") from exc
    names = shared_names(prepared, model)
    calibration = calibration_batches(data, quantize)
    calibrate(prepared, calibration)  # the initial ranges: ONNX Runtime's, from the same images
    freeze(prepared, batchnorm=True, observers=False)
    follow_ranges(prepared)
    train_settings = TrainSettings(
        steps=steps,
        batch_size=settings.batch_size,
        lr=settings.lr * QAT_LR_FACTOR,
        distill=settings.distill,
        train_dtype="fp32",  # fake quantization is defined on FP32 values
        seed=settings.seed + 1,  # other batches than the FP32 fine-tune's first epoch
        device=str(resolve(settings.device)),  # auto -> cpu or cuda:0
    )
    result = train(
        prepared,
        data,
        train_settings,
        teacher=teacher,
        reporter=reporter,
        description=description,
        steps_per_epoch=math.ceil(len(data.train) / settings.batch_size),
        checkpoint=checkpoint,
    )
    copy_back(prepared, model, names)
    calibrate(prepared, calibration)  # the final ranges, as ONNX Runtime will compute them on these weights
    model.eval()
    record = {
        "steps": steps,
        "epochs": settings.qat_epochs if settings.epochs > settings.qat_epochs else settings.epochs,
        "lr": train_settings.lr,
        "batchnorm": "statistics frozen during QAT",
        "weights": f"per-channel symmetric INT8, {'7-bit (reduce_range)' if quantize.reduce_range else '8-bit'}",
        "activations": "per-tensor UINT8, MinMax ranges on the calibration images",
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(result.seconds, 1),
    }
    return QatResult(model=prepared.eval(), record=record)


@torch.no_grad()
def fake_quant_agreement(
    fake_quant: nn.Module, int8_onnx: bytes, data: Dataset, split: str, limit: int | None, threads: int
) -> dict[str, Any]:
    """How often ONNX Runtime's INT8 model predicts the fake-quantized PyTorch model's class, and each one's top-1."""
    session = open_session(int8_onnx, threads)
    fake_quant.eval()
    same = right_fq = right_int8 = seen = 0
    for x, y in data.batches(split, 64, shuffle=limit is not None, augment=False, limit=limit):
        expected = fake_quant(x).argmax(1).numpy()
        got = session.run(None, {"input": x.numpy()})[0].argmax(1)
        labels = y.numpy()
        same += int((expected == got).sum())
        right_fq += int((expected == labels).sum())
        right_int8 += int((got == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError(f"split {split!r} is empty")
    return {
        "agreement_with_fake_quant": same / seen,
        "fake_quant_top1": right_fq / seen,
        "int8_top1": right_int8 / seen,
        "images": seen,
    }


def check_against_fake_quant(
    qat: QatResult, int8_onnx: bytes, data: Dataset, split: str, settings: ExportSettings, threads: int
) -> dict[str, Any]:
    """The QAT record with the INT8 model's agreement with the fake-quantized model; refuses one below the bar."""
    measured = fake_quant_agreement(qat.model, int8_onnx, data, split, settings.test_images, threads)
    record = {**qat.record, **measured, "min_agreement": settings.min_qat_agreement}
    if measured["agreement_with_fake_quant"] < settings.min_qat_agreement:
        raise CheckFailed(
            f"the INT8 model agrees with the fake-quantized PyTorch model it was trained as on only "
            f"{measured['agreement_with_fake_quant']:.1%} of {measured['images']} {split} images (needs "
            f"{settings.min_qat_agreement:.0%}); nothing was exported; export it with --quantization ptq"
        )
    return record
