"""Turn a searched policy into a shipped model: rebuild, fine-tune, check, write.

For each chosen trial: rebuild the pruned model from the stored baseline and the trial's
pruning history (:mod:`search.shipping.rebuild`), fine-tune it for whole epochs (resumable) and
measure top-1 on the test split next to the baseline's, export ONNX with a dynamic batch axis
and check ONNX Runtime against PyTorch (and INT8 against FP32, :mod:`search.shipping.checks`),
re-measure latency the way the search did (:mod:`search.measuring.candidate`), and write the
model files and card.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.errors import UsageError
from search.measuring.candidate import CandidateMeter, LocalTimer, Timer
from search.measuring.complexity import macs_and_params
from search.measuring.hardware import git_revision, package_versions
from search.measuring.onnx_export import export_onnx
from search.measuring.runtimes.registry import get_runtime, require_runtime
from search.measuring.timing import Latency, LatencySettings
from search.progress import NullReporter, Reporter
from search.pruning.channels import layer_channels
from search.pruning.policy import Policy
from search.shipping.best_epoch import BestEpoch
from search.shipping.card import card_markdown
from search.shipping.checks import check_parity, quantize_and_check
from search.shipping.model_file import save_pruned, save_torchscript
from search.shipping.preprocessing import preprocessing_record
from search.shipping.rebuild import StudyBaseline, rebuild_pruned
from search.shipping.runtime_files import ship_runtime_files, study_runtime, timed_file_of
from search.shipping.settings import ExportSettings
from search.study.front import Row, finished_trial, rows
from search.training.device import device_record, resolve
from search.training.evaluate import top1
from search.training.finetune import FinetuneResult, TrainSettings, recalibrate_batchnorm, train

__all__ = ["export_trial"]


@dataclass(frozen=True)
class _FineTuned:
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
class _Checked:
    onnx: bytes
    """The FP32 export (dynamic batch), as written to ``model.onnx``."""
    parity: dict[str, Any]
    int8: dict[str, Any] | None
    """The INT8 check (its model bytes under ``"onnx"``) when the trial searched INT8."""


def export_trial(
    base: StudyBaseline,
    number: int,
    settings: ExportSettings,
    out_dir: Path,
    *,
    command: str,
    force: bool = False,
    reporter: Reporter | None = None,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Export trial ``number`` into ``out_dir``; returns the model card.

    ``timer`` times the export (default: here, with the study's threads); a study whose latencies
    were measured on a latency target must be exported with that target's timer.
    """
    reporter = reporter or NullReporter()
    settings = replace(settings, device=str(resolve(settings.device)))  # auto -> cpu or cuda:0
    trial = finished_trial(base.study, number)
    timer = _timer_for(base, timer)
    work = _prepare(out_dir, force, reporter)  # moved into place once every check has passed
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    row = next(r for r in rows(base.study) if r.number == number)
    if not row.feasible:
        reporter.warn(f"trial {number} is over the study's budget ({row.latency_ms:.2f} ms)")

    reporter.phase(f"trial {number}: rebuild")
    model = rebuild_pruned(base, trial)
    split = "test" if base.data.test is not None else "val"
    reporter.phase(f"trial {number}: baseline top-1 on {split}")
    baseline_top1 = _baseline_top1(base, split, settings.test_images, reporter, settings.device)

    reporter.phase(f"trial {number}: fine-tune")
    t = time.perf_counter()
    unpruned = Policy.from_dict(trial.user_attrs["policy"]).is_unpruned
    tuned = _finetune(base, model, number, settings, split, work / "finetune-state.pt", reporter, unpruned)
    seconds["finetune"] = time.perf_counter() - t

    checked = _export_and_check(base, model, trial, settings, split, seconds, reporter)
    (work / "model.onnx").write_bytes(checked.onnx)
    int8_onnx = checked.int8.pop("onnx") if checked.int8 is not None else None
    if int8_onnx is not None:
        (work / "model.int8.onnx").write_bytes(int8_onnx)
    t = time.perf_counter()
    quantization = trial.user_attrs.get("quantization")
    runtime_record = ship_runtime_files(
        timer.runtime,
        model,
        checked.onnx,
        int8_onnx,
        quantization,
        base.data,
        split,
        settings,
        work,
        base.threads,
        reporter,
    )
    seconds["runtime_files"] = time.perf_counter() - t

    reporter.phase(f"trial {number}: latency")
    t = time.perf_counter()
    meter = CandidateMeter(base.model, base.data, timer=timer)
    measured = meter.time_onnx(timed_file_of(timer, work, checked.onnx, int8_onnx))
    if checked.int8 is not None:  # the FP32 export too, so the card can show what INT8 gained
        fp32_measured = meter.time_onnx(timed_file_of(timer, work, checked.onnx, None))
        checked.int8["fp32_latency_ms"] = round(fp32_measured.median_ms, 4)
        checked.int8["fp32_ratio"] = round(fp32_measured.ratio or 0.0, 5)
        checked.int8["fp32_after_finetune"] = tuned.after
    seconds["latency"] = time.perf_counter() - t

    save_pruned(work / "model.pt", model, base, trial)
    save_torchscript(work / "model.torchscript.pt", model, base.data)
    (work / "finetune-state.pt").unlink(missing_ok=True)
    seconds["total"] = time.perf_counter() - started
    card = _card(base, trial, row, model, work, settings, split, baseline_top1, tuned, checked, measured, timer)
    card["runtime_files"] = runtime_record
    card["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    card["augmentation"] = base.data.transforms()  # what the fine-tune trained on, and how top-1 was scored
    card["train_device"] = device_record(torch.device(settings.device))
    card["command"] = command
    (work / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (work / "card.md").write_text(card_markdown(card))
    _move_into_place(work, out_dir)
    return card


def _timer_for(base: StudyBaseline, timer: Timer | None) -> Timer:
    """``timer``, or a local one; refused before any work when it cannot time like the search did."""
    measured_on = base.study.user_attrs.get("latency_measured_on", "local")
    runtime = study_runtime(base.study)
    if timer is not None and timer.runtime != runtime:
        raise UsageError(
            f"study {base.study.study_name!r} was timed in {runtime}, the latency target {timer.where} times in "
            f"{timer.runtime}; start it with --runtime {runtime}"
        )
    if timer is None:
        if measured_on != "local":
            raise UsageError(
                f"study {base.study.study_name!r} was timed on the latency target {measured_on}; pass --target "
                f"{measured_on} (and its token) so the export is timed there too"
            )
        require_runtime(runtime)
        return LocalTimer(LatencySettings(threads=base.threads, runtime=runtime))
    if timer.threads != base.threads:
        raise UsageError(
            f"the latency target {timer.where} times with {timer.threads} thread(s), but the study used "
            f"{base.threads}; start it with --threads {base.threads}"
        )
    return timer


def _prepare(out_dir: Path, force: bool, reporter: Reporter) -> Path:
    """The folder an export is written in before it is moved to ``out_dir`` (resumed if unfinished).

    A finished export in ``out_dir`` is replaced only with ``force``, and only once the new one has
    passed every check; a failed export leaves nothing in ``out_dir`` a user could take for a verified one.
    """
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        if (out_dir / "card.json").exists():
            raise UsageError(f"{out_dir} already holds an export; pass --force to replace it or --out elsewhere")
        raise UsageError(f"{out_dir} exists and is not an export; pass --force or --out elsewhere")
    work = _partial(out_dir)
    if (work / "finetune-state.pt").exists():
        reporter.info(f"Resuming the unfinished export in {work}")
    elif work.exists():
        shutil.rmtree(work)  # what a failed export left: nothing in it passed its checks
    work.mkdir(parents=True, exist_ok=True)
    return work


def _partial(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


def _move_into_place(work: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)  # --force, or an empty folder
    work.rename(out_dir)


def _baseline_top1(base: StudyBaseline, split: str, limit: int | None, reporter: Reporter, device: str) -> float:
    """The baseline's top-1 on ``split`` (or its random subset of ``limit`` images), measured once per study."""
    key = f"baseline_top1_{split}" + (f"_{limit}" if limit else "")
    stored = base.study.user_attrs.get(key)
    if stored is not None and stored.get("sha256") == base.sha256:
        return float(stored["top1"])
    value = top1(base.model, base.data, split, limit=limit, reporter=reporter, device=device)
    base.study.set_user_attr(key, {"top1": value, "sha256": base.sha256})
    return value


def _finetune(
    base: StudyBaseline,
    model: nn.Module,
    number: int,
    settings: ExportSettings,
    split: str,
    state: Path,
    reporter: Reporter,
    unpruned: bool = False,
) -> _FineTuned:
    """BatchNorm recalibration (unless resuming), top-1, whole epochs of fine-tuning, top-1 again.

    A policy that prunes nothing keeps the baseline's weights unless ``settings.finetune_unpruned``.
    """
    data = base.data
    skip = unpruned and not settings.finetune_unpruned
    if skip:
        reporter.info(
            f"Trial {number} prunes nothing: it keeps the baseline's weights, not fine-tuned "
            "(pass --finetune-unpruned to fine-tune it anyway)"
        )
    elif not state.exists():
        recalibrate_batchnorm(model, data, batches=8, seed=settings.seed, device=settings.device)
    before = top1(model, data, split, limit=settings.test_images, reporter=reporter, device=settings.device)
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    planned = settings.steps if settings.steps is not None else max(1, round(settings.epochs * steps_per_epoch))
    train_settings = TrainSettings(
        steps=0 if skip else planned,
        batch_size=settings.batch_size,
        lr=settings.lr,
        distill=settings.distill,
        train_dtype=settings.train_dtype,
        seed=settings.seed,
        device=settings.device,
    )
    epochs = BestEpoch(state.parent, data, limit=settings.test_images, device=settings.device)
    if not skip and not state.exists():
        epochs.consider(0, model)  # the recalibrated weights, before any step
    result = train(
        model,
        data,
        train_settings,
        teacher=base.model,
        reporter=reporter,
        description=f"fine-tune trial {number} ({settings.epochs:g} epochs, seed {settings.seed})",
        steps_per_epoch=steps_per_epoch,
        checkpoint=state,
        after_epoch=None if skip else epochs.consider,
    )
    kept = epochs.restore(model)
    if kept is not None and kept != max(epochs.scores):
        reporter.info(
            f"Kept epoch {kept} of {max(epochs.scores)}: val top-1 {epochs.scores[kept]:.4f} against "
            f"{epochs.scores[max(epochs.scores)]:.4f} for the last"
        )
    after = (
        before
        if skip
        else top1(model, data, split, limit=settings.test_images, reporter=reporter, device=settings.device)
    )
    scores = {str(e): round(v, 4) for e, v in sorted(epochs.scores.items())}
    epochs.discard()
    return _FineTuned(before, after, train_settings, result, skipped=skip, kept_epoch=kept, val_top1=scores)


def _export_and_check(
    base: StudyBaseline,
    model: nn.Module,
    trial: optuna.trial.FrozenTrial,
    settings: ExportSettings,
    split: str,
    seconds: dict[str, float],
    reporter: Reporter,
) -> _Checked:
    """The FP32 ONNX export checked against PyTorch, and for an INT8 trial its INT8 model checked against it."""
    reporter.phase(f"trial {trial.number}: export and check ONNX")
    t = time.perf_counter()
    model.eval()
    onnx_model = export_onnx(model, base.data.example_input(), dynamic_batch=True)
    parity = check_parity(model, onnx_model, base.data, split, settings, base.threads)
    seconds["export"] = time.perf_counter() - t
    int8 = None
    if trial.user_attrs.get("precision") == "int8":
        reporter.phase(f"trial {trial.number}: quantize to INT8 and check it")
        t = time.perf_counter()
        int8 = quantize_and_check(model, onnx_model, base.data, split, settings, trial, base.threads, reporter)
        seconds["quantize"] = time.perf_counter() - t
    return _Checked(onnx=onnx_model, parity=parity, int8=int8)


def _card(
    base: StudyBaseline,
    trial: optuna.trial.FrozenTrial,
    row: Row,
    model: nn.Module,
    out_dir: Path,
    settings: ExportSettings,
    split: str,
    baseline_top1: float,
    tuned: _FineTuned,
    checked: _Checked,
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
