"""What one export produced (:class:`FineTuned`, :class:`Checked`) and its ``card.json`` record."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from search.measuring.candidate import Timer
from search.measuring.complexity import macs_and_params
from search.measuring.hardware import git_revision, package_versions
from search.measuring.runtimes.registry import get_runtime
from search.measuring.timing import Latency
from search.pruning.channels import layer_channels
from search.shipping.preprocessing import preprocessing_record
from search.shipping.rebuild import StudyBaseline
from search.shipping.settings import ExportSettings
from search.study.front import Row
from search.training.finetune import FinetuneResult, TrainSettings

__all__ = ["Checked", "FineTuned", "card_record"]


@dataclass(frozen=True)
class FineTuned:
    before: float
    after: float
    settings: TrainSettings
    result: FinetuneResult
    skipped: bool = False
    """Not fine-tuned: the policy prunes nothing (and fine-tuning it was not asked for)."""
    kept_epoch: int | None = None
    """The epoch whose weights were kept: the best validation top-1 (0: before fine-tuning)."""
    val_top1: dict[str, float] | None = None
    """Validation top-1 after each epoch (``"0"``: before fine-tuning)."""


@dataclass(frozen=True)
class Checked:
    onnx: bytes
    """The FP32 export (dynamic batch), as written to ``model.onnx``."""
    parity: dict[str, Any]
    int8: dict[str, Any] | None
    """The INT8 check (its model bytes under ``"onnx"``) when the trial searched INT8."""


def card_record(
    base: StudyBaseline,
    trial: optuna.trial.FrozenTrial,
    row: Row,
    model: nn.Module,
    out_dir: Path,
    settings: ExportSettings,
    split: str,
    baseline_top1: float,
    tuned: FineTuned,
    checked: Checked,
    measured: Latency,
    timer: Timer,
) -> dict[str, Any]:
    """``card.json``: what was exported, how it scored and timed, and what it was made from.

    ``seconds`` and ``command`` are left for the caller to fill in (their places are kept).
    """
    data = base.data
    study_base_ms = float(base.study.user_attrs["baseline_latency_ms"])
    macs, params = macs_and_params(model, data.input_size)
    return {
        "study": base.study.study_name,
        "trial": trial.number,
        "recipe": row.recipe,
        "policy": trial.user_attrs["policy"],
        "channels": layer_channels(model),
        "accuracy": {
            "split": split,
            "images": min(len(data.split(split)), settings.test_images or len(data.split(split))),
            "search_brief_finetune_val": row.accuracy,
            "before_finetune": tuned.before,
            "after_finetune": tuned.after,
            "baseline": baseline_top1,
        },
        "finetune": {
            **asdict(settings),
            "steps": tuned.settings.steps,
            "seconds": round(tuned.result.seconds, 1),
            "images_per_second": round(tuned.result.images_per_second, 1),
            "skipped": "nothing was pruned" if tuned.skipped else None,
            "kept_epoch": tuned.kept_epoch,
            "val_top1_by_epoch": tuned.val_top1,
        },
        "latency": {
            "median_ms": round(measured.median_ms, 4),
            "p90_ms": round(measured.p90_ms, 4),
            "baseline_median_ms": round(measured.reference_median_ms or 0.0, 4),
            "ratio": round(measured.ratio or 0.0, 5),
            "corrected_ms": round((measured.ratio or 0.0) * study_base_ms, 4),
            "search_ms": row.latency_ms,
            "threads": base.threads,
            "batch": 1,
            "runtime": get_runtime(timer.runtime).info.label,
            "runtime_name": timer.runtime,
            "measured_on": timer.where,
        },
        "onnx_check": checked.parity,
        "precision": "int8" if checked.int8 is not None else "fp32",
        "quantization": None if checked.int8 is None else checked.int8["mode"],
        "int8": checked.int8,
        "macs": macs,
        "params": params,
        "files": {
            name: (out_dir / name).stat().st_size
            for name in (
                *("model.onnx", "model.int8.onnx", "model.pt", "model.torchscript.pt"),
                *("model.xml", "model.bin", "model.int8.xml", "model.int8.bin", "model.pte", "model.int8.pte"),
            )
            if (out_dir / name).exists()
        },
        "data": {
            "source": base.study.user_attrs["config"]["data"]["source"],
            "input_size": data.input_size,
            "mean": list(data.mean),
            "std": list(data.std),
            "classes": data.classes,
        },
        "preprocessing": preprocessing_record(data),
        "baseline": {"model": base.model_name, "weights": base.weights, "sha256": base.sha256},
        "budget_ms": base.study.user_attrs["budget_ms"],
        "seconds": {},
        "command": "",
        "versions": package_versions(),
        "git_revision": git_revision(),
        "hardware": timer.fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
