"""The search's settings, as the rooms take them, and what a resumed study must share with its creator.

A study's numbers are comparable only under the settings that made them: a rerun (or a worker
that joins) with a different budget, model, baseline, data, space, threads, fine-tune or
precision is refused with the flag that differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import optuna

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.quantize import QuantizeSettings
from search.pruning.space import SearchSpace
from search.study.config import SearchConfig
from search.study.storage import masked
from search.training.baseline import Baseline
from search.training.evaluate import subset_limit
from search.training.finetune import TrainSettings

__all__ = [
    "STUDY_FORMAT",
    "check_resumable",
    "check_same_data",
    "check_same_device_kind",
    "data_settings",
    "finetune_settings",
    "quantize_settings",
    "settings_that_must_match",
    "with_study_fraction",
]


STUDY_FORMAT = 1
"""How this version records a study. Bump it when a stored record changes so that older code would misread it:
a worker refuses a study of a later format (and one whose settings name what it does not know) rather than
read it wrongly. Studies made before the number existed are format 0 and read as before."""


def settings_that_must_match(
    config: SearchConfig, data: Dataset, space: SearchSpace, baseline: Baseline
) -> dict[str, Any]:
    """What a resumed study must share with the run that created it, or its numbers mix."""
    return {
        "budget": config.budget_ms if config.budget_ms is not None else f"{config.budget_fraction:g}x",
        "model": config.model,
        **data_settings(data),  # before the baseline: a baseline trained here follows the data
        "baseline_sha256": baseline.sha256,
        "space_sha256": hashlib.sha256(space.text.encode()).hexdigest()[:16],
        "threads": config.threads,
        "finetune_steps": config.finetune_steps,
        "finetune_batch": config.finetune_batch,
        "finetune_lr": config.finetune_lr,
        "distill": config.distill,
        "bn_batches": config.bn_batches,
        "val_images": config.val_images,
        "precisions": list(config.precisions),
        "calibration_method": config.calibration_method,
        "calibration_images": config.calibration_images,
        "rungs": list(config.rung_steps),  # a trial's rung-r accuracy means the same steps in every run
        "promote_fraction": round(config.promoted_fraction, 6) if config.rung_steps else None,
        # what a promotion reads: the same images in every run, or rung records stop pairing (None: all of val)
        "rung_val_images": subset_limit(len(data.split("val")), config.promotion_val_images)
        if config.rung_steps
        else None,
        "sampler": config.sampler,  # workers of one study propose policies the same way
        "format": STUDY_FORMAT,  # checked apart: a later version reads an earlier format
    }


def data_settings(data: Dataset) -> dict[str, Any]:
    """The data's part of :func:`settings_that_must_match`: what a user names first, the hashes last."""
    return {
        "input_size": data.input_size,
        "mean": [round(float(v), 6) for v in data.mean],
        "std": [round(float(v), 6) for v in data.std],
        "data_files": data.content_sha256,
        "data_fingerprint": data.fingerprint,
    }


def check_same_data(study: optuna.Study, data: Dataset, config: SearchConfig) -> None:
    """Refuse different data before a baseline is trained for it (a study still being created is let through)."""
    if study.user_attrs.get("settings") is not None:
        check_resumable(study, data_settings(data), config)


_FLAGS = {
    "budget": "--budget-ms/--budget-fraction",
    "model": "--model",
    "baseline_sha256": "--weights",
    "input_size": "--input-size",
    "mean": "--mean",
    "std": "--std",
    "data_files": "--data (its files' contents)",
    "data_fingerprint": "--data",
    "space_sha256": "--space (its contents)",
    "threads": "--threads",
    "finetune_steps": "--finetune-steps",
    "finetune_batch": "--finetune-batch",
    "finetune_lr": "--finetune-lr",
    "distill": "--distill",
    "bn_batches": "--bn-batches",
    "val_images": "--val-images",
    "precisions": "--precision",
    "calibration_method": "--calibration-method",
    "calibration_images": "--calibration-images",
    "rungs": "--rungs/--no-promotion",
    "promote_fraction": "--promote-fraction",
    "rung_val_images": "--rung-val-images",
    "sampler": "--sampler",
}


def check_resumable(study: optuna.Study, settings: dict[str, Any], config: SearchConfig) -> None:
    stored = study.user_attrs.get("settings")
    if stored is None:
        raise UsageError(
            f"study {config.study_name!r} in {masked(config.storage_url)} was not made by this tool; "
            "pick another --study name"
        )
    _check_format(stored, config)
    for key, value in settings.items():
        if key == "format":
            continue
        if key not in stored and key in _BEFORE and stored.get("rungs"):
            stored = {**stored, key: _BEFORE[key]}  # made before the setting existed: it did what it now names
        if key in stored and stored[key] != value:
            raise UsageError(
                f"study {config.study_name!r} was created with a different {_FLAGS.get(key, key)} "
                f"({_shown(key, stored[key])}, now {_shown(key, value)}){_DETAIL.get(key, '')}; "
                "rerun with the same settings to resume, or pass --study NEW"
            )


def _check_format(stored: dict[str, Any], config: SearchConfig) -> None:
    """Refuse a study written by a later version of this tool (its format, or settings this one does not know)."""
    found = stored.get("format", 0)
    unknown = sorted(set(stored) - set(_FLAGS) - {"format"})
    if (isinstance(found, int) and found > STUDY_FORMAT) or unknown:
        what = (
            f"study format {found}, this version reads up to {STUDY_FORMAT}"
            if not unknown
            else (f"it records settings this version does not know: {', '.join(unknown)}")
        )
        raise UsageError(
            f"study {config.study_name!r} was written by a later version of prune-search ({what}); "
            "install the same version on every worker (pip install -U in each one's environment)"
        )


_BEFORE = {"rung_val_images": None}
"""Settings a promoting study made before they existed had, as they are named now (promotions read all of val)."""

_DETAIL = {
    "data_files": " (an image file was replaced or edited since: the hash covers every file's bytes)",
    "data_fingerprint": " (the data source, its file names or sizes, the split, --input-size, --mean or --std)",
}
"""What a changed hash stands for, since the two hashes alone say nothing."""


def _shown(key: str, value: Any) -> str:
    if key == "rung_val_images" and value is None:
        return "all of val"
    if key in ("mean", "std") and isinstance(value, list):
        return ",".join(f"{v:g}" for v in value)
    return repr(value)


def with_study_fraction(config: SearchConfig, study: optuna.Study | None) -> SearchConfig:
    """``config`` with the promoted fraction fixed: as given, else the resumed study's own, else the default.

    So a study made under another default (a third, before the quarter) resumes as it began without a flag;
    a ``--promote-fraction`` given explicitly that differs from the study's is refused as any setting is.
    """
    if config.promote_fraction is not None:
        return config
    stored = ((study.user_attrs.get("settings") or {}) if study is not None else {}).get("promote_fraction")
    return replace(config, promote_fraction=stored if stored is not None else config.promoted_fraction)


def quantize_settings(config: SearchConfig) -> QuantizeSettings:
    return QuantizeSettings(calibration_method=config.calibration_method, calibration_images=config.calibration_images)


def finetune_settings(config: SearchConfig) -> TrainSettings:
    """The brief fine-tune of every feasible trial."""
    return TrainSettings(
        steps=config.finetune_steps,
        batch_size=config.finetune_batch,
        lr=config.finetune_lr,
        distill=config.distill,
        train_dtype=config.train_dtype,
        device=config.device,
    )


def check_same_device_kind(study: optuna.Study, record: dict[str, Any], config: SearchConfig) -> None:
    """Refuse to add trials fine-tuned on another kind of device (numerics differ) unless the user allows it."""
    stored = study.user_attrs.get("train_device")
    if stored is None or config.allow_mixed_devices:
        return
    was, now = stored.get("precision"), record.get("precision")
    if stored.get("kind") == record["kind"] and was is not None and now is not None and was != now:
        raise UsageError(
            f"study {config.study_name!r} fine-tunes in {was}, this run in {now}; their accuracies are not quite "
            f"comparable: pass --train-dtype {was}, or --allow-mixed-devices to mix them in one study"
        )
    if stored.get("kind") == record["kind"]:
        return
    raise UsageError(
        f"study {config.study_name!r} fine-tunes on {stored['kind']} ({stored.get('name')}), this run on "
        f"{record['kind']} ({record['name']}); their accuracies are not quite comparable: pass --device "
        f"{stored['kind']}, or --allow-mixed-devices to mix them in one study"
    )
