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
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.errors import UsageError
from search.measuring.candidate import CandidateMeter, Timer
from search.measuring.isolated import IsolatedTimer
from search.measuring.onnx_export import export_onnx
from search.measuring.quantize import QuantizeSettings
from search.measuring.runtimes.registry import require_runtime, study_runtime
from search.measuring.timing import LatencySettings
from search.progress import NullReporter, Reporter
from search.pruning.policy import Policy
from search.shipping.best_epoch import BestEpoch
from search.shipping.card import card_markdown
from search.shipping.checks import check_parity, quantize_and_check
from search.shipping.export_record import Checked, FineTuned, card_record
from search.shipping.iterative import SCHEDULE_FILE, Recovery
from search.shipping.model_file import save_pruned, save_torchscript
from search.shipping.qat import QatResult, check_against_fake_quant, check_quantization, qat_finetune, split_steps
from search.shipping.rebuild import StudyBaseline, rebuild_pruned
from search.shipping.runtime_files import ship_runtime_files, timed_file_of
from search.shipping.settings import ExportSettings
from search.study.front import finished_trial, rows
from search.training.device import device_record, resolve
from search.training.evaluate import top1
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train

__all__ = ["QAT_STATE", "export_trial"]

QAT_STATE = "qat-state.pt"
"""The quantization-aware training's checkpoint in an unfinished export (removed when it is done)."""


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
    check_quantization(base.study, number, settings)
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
    fp32_settings, qat_steps = split_steps(settings, math.ceil(len(base.data.train) / settings.batch_size))
    planned, per_epoch = _planned(base, fp32_settings), _epoch_steps(base, fp32_settings)
    recovery = Recovery(base, trial, model, fp32_settings, work, reporter, planned, per_epoch)
    model = recovery.prune(model)  # K > 1: the baseline taken through steps 1..K-1, now at the trial's channels
    state = work / "finetune-state.pt"
    tuned = _finetune(base, model, number, fp32_settings, split, state, reporter, unpruned, recovery)
    seconds["finetune"] = time.perf_counter() - t
    qat = None
    if qat_steps:  # the last part of the fine-tune, with fake quantization (search.shipping.qat)
        reporter.phase(f"trial {number}: quantization-aware training")
        quantize = QuantizeSettings.from_dict(trial.user_attrs.get("quantization", {}))
        what = f"QAT trial {number} ({qat_steps} steps, seed {settings.seed})"
        qat = qat_finetune(
            model, base.model, base.data, settings, quantize, qat_steps, reporter, what, work / QAT_STATE
        )
        qat.record["fp32_top1_before_qat"] = tuned.after
        after = top1(model, base.data, split, limit=settings.test_images, reporter=reporter, device=settings.device)
        tuned = replace(tuned, after=after, settings=replace(tuned.settings, steps=tuned.settings.steps + qat_steps))
        seconds["qat"] = qat.record["seconds"]

    checked = _export_and_check(base, model, trial, settings, split, seconds, reporter, qat)
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
    seconds["total"] = time.perf_counter() - started
    card = card_record(base, trial, row, model, work, settings, split, baseline_top1, tuned, checked, measured, timer)
    recovery.annotate(card, round(tuned.result.seconds, 1))
    if qat_steps:  # the schedule counts the FP32 steps and seconds (none when QAT is all of it); QAT's came after
        card["finetune"]["steps"] += qat_steps
        card["finetune"]["seconds"] = round(card["finetune"]["seconds"] + seconds["qat"], 1)
        if card.get("feature_distill", {}).get("weight"):  # QAT trains on logit distillation alone
            card["feature_distill"]["qat_steps_without"] = qat_steps
    card["runtime_files"] = runtime_record
    card["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    card["augmentation"] = base.data.transforms()  # what the fine-tune trained on, and how top-1 was scored
    card["train_device"] = device_record(torch.device(settings.device))
    card["command"] = command
    (work / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (work / "card.md").write_text(card_markdown(card))
    # Only now: an export interrupted before this point (the card's MAC count, git, a full disk) resumes from
    # its fine-tune's files instead of training again.
    (work / "finetune-state.pt").unlink(missing_ok=True)
    (work / QAT_STATE).unlink(missing_ok=True)
    BestEpoch(work, base.data).discard()
    recovery.discard()
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
        return IsolatedTimer(LatencySettings(threads=base.threads, runtime=runtime))
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
    check_out_dir(out_dir, force)
    work = _partial(out_dir)
    if any((work / name).exists() for name in ("finetune-state.pt", QAT_STATE, SCHEDULE_FILE)):
        reporter.info(f"Resuming the unfinished export in {work}")
    elif work.exists():
        shutil.rmtree(work)  # what a failed export left: nothing in it passed its checks
    work.mkdir(parents=True, exist_ok=True)
    return work


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an ``out_dir`` that holds something unless ``force``."""
    if out_dir.is_file():
        raise UsageError(f"{out_dir} is a file; pass --out a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        if (out_dir / "card.json").exists():
            raise UsageError(f"{out_dir} already holds an export; pass --force to replace it or --out elsewhere")
        raise UsageError(f"{out_dir} exists and is not an export; pass --force or --out elsewhere")


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
    recovery: Recovery | None = None,
) -> FineTuned:
    """BatchNorm recalibration, top-1, whole epochs of fine-tuning (resumed from ``state``), top-1 again.

    A policy that prunes nothing keeps the baseline's weights unless ``settings.finetune_unpruned``.
    """
    data = base.data
    skip = unpruned and not settings.finetune_unpruned
    if skip:
        reporter.info(
            f"Trial {number} prunes nothing: it keeps the baseline's weights, not fine-tuned "
            "(pass --finetune-unpruned to fine-tune it anyway)"
        )
    else:  # on a resume too, so that top-1 before the fine-tune is the fresh run's (the checkpoint replaces the rest)
        recalibrate_batchnorm(model, data, batches=8, seed=settings.seed, device=settings.device)
    before = top1(model, data, split, limit=settings.test_images, reporter=reporter, device=settings.device)
    steps_per_epoch = _epoch_steps(base, settings)
    planned = recovery.final_steps if recovery is not None else _planned(base, settings)
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
        features=None if skip or recovery is None or not planned else recovery.distiller(model),  # 0 steps: none
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
    # The best epoch's files stay until the export is complete (export_trial): one that dies after the
    # fine-tune (in QAT, the checks or the timing) resumes from the kept epoch, not the last.
    return FineTuned(before, after, train_settings, result, skipped=skip, kept_epoch=kept, val_top1=scores)


def _epoch_steps(base: StudyBaseline, settings: ExportSettings) -> int:
    return math.ceil(len(base.data.train) / settings.batch_size)


def _planned(base: StudyBaseline, settings: ExportSettings) -> int:
    """Optimizer steps of the whole fine-tune (over every pruning step)."""
    if settings.steps is not None:
        return settings.steps
    if settings.epochs == 0:  # no fine-tune: the pruned model ships with its recalibrated BatchNorm statistics
        return 0
    return max(1, round(settings.epochs * _epoch_steps(base, settings)))


def _export_and_check(
    base: StudyBaseline,
    model: nn.Module,
    trial: optuna.trial.FrozenTrial,
    settings: ExportSettings,
    split: str,
    seconds: dict[str, float],
    reporter: Reporter,
    qat: QatResult | None = None,
) -> Checked:
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
        int8["mode"] = "ptq" if qat is None else "qat"
        if qat is not None:  # the INT8 model must compute what the fake-quantized model trained
            int8["qat"] = check_against_fake_quant(qat, int8["onnx"], base.data, split, settings, base.threads)
        seconds["quantize"] = time.perf_counter() - t
    return Checked(onnx=onnx_model, parity=parity, int8=int8)
