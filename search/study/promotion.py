"""Promotion inside the search: the best trials go on to longer fine-tunes, asynchronously (ASHA).

After each trial (and, once the study has its trials, until none is left) a worker asks
:func:`search.study.rungs.promotable` which trials belong in the next rung, claims one through the
study (:mod:`search.study.claims`, so two workers never promote the same trial), rebuilds the
trial's pruned model, loads the weights its last rung left (:mod:`search.study.trial_weights`),
fine-tunes it on to the rung's total steps, saves the new weights and reads its top-1 on the whole
validation split (at most ``--rung-val-images`` of it, a fixed subset the same for every trial). The
rung's record goes into the study attribute ``rung:N`` before the claim is marked done, so a worker
killed at any point loses no finished rung, and a rerun (or another worker) takes the claim over and
does the rung again from the previous rung's weights.

The trial's own values stay those of rung 0 (a finished trial's values cannot change); the sampler
learns from the highest rung on rung 0's scale, so it never favours a policy for having been trained
longer (:mod:`search.study.fidelity`). The reports use each trial's highest rung
(:func:`search.study.front.rows`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from search.errors import UsageError
from search.measuring.quantize import quantize_model
from search.progress import Reporter
from search.pruning.groups import replay
from search.pruning.policy import Policy
from search.study.claims import Claim, ClaimLost, claim_promotion, rdb_storage
from search.study.config import SearchConfig
from search.study.coordination import progress, worker_identity
from search.study.notes import refresh_note
from search.study.rungs import EAGER_SHARE, PromotionSettings, promotable, rung_key, stored_rungs, trial_rungs
from search.study.trial import TrialContext
from search.study.trial_weights import file_sha256, load_weights_into, save_weights, weights_path
from search.study.uncertainty import SPLIT_ORDER, SUBSET_ORDER, accuracy_record
from search.training.evaluate import onnx_top1_correct, subset_limit, top1_correct
from search.training.finetune import train

__all__ = ["prepare_promotion", "promote_all", "promote_next", "promotion_line", "promotion_settings"]


def promotion_settings(config: SearchConfig) -> PromotionSettings | None:
    """The search's promotion settings, or None with ``--no-promotion`` (or no rung above 0)."""
    steps = config.rung_steps
    if not steps:
        return None
    folder = Path(config.trial_weights) if config.trial_weights else Path(config.studies_dir) / config.study_name
    if not config.trial_weights:
        folder = folder / "trial-weights"
    return PromotionSettings(
        rung_steps=steps, fraction=config.promoted_fraction, folder=folder, val_images=config.promotion_val_images
    )


def prepare_promotion(settings: PromotionSettings, finetune_steps: int, val_split: int | None = None) -> str:
    """Make the weights folder (a one-line error when it cannot be); one line for the log saying what promotes."""
    try:
        settings.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot make the trial weights folder {settings.folder}: {exc.strerror or exc}; pass a writable "
            "--trial-weights DIR (shared by all hosts' workers), or --no-promotion"
        ) from None
    rungs = ", ".join(f"rung {i} at {steps}" for i, steps in enumerate(settings.rung_steps, 1))
    return (
        f"Promotion: the best {settings.fraction:.0%} of the trials at each rung are fine-tuned on from their "
        f"weights (while trials still run, the best {settings.fraction * EAGER_SHARE:.0%} so far) and read on "
        f"{_images_read(settings.val_images, val_split)} (rung 0 at {finetune_steps} steps, "
        f"{rungs}; weights in {settings.folder}); --no-promotion turns it off"
    )


def _images_read(limit: int | None, val_split: int | None) -> str:
    """What a promotion reads, in words: all of val, or a fixed subset of ``limit`` of its ``val_split`` images."""
    if val_split is None:
        return "all validation images" if limit is None else f"at most {limit:,} validation images"
    if subset_limit(val_split, limit) is None:
        return f"all {val_split:,} validation images"
    return f"a fixed {limit:,} of the {val_split:,} validation images (--rung-val-images)"


def promotion_line(config: SearchConfig, settings: PromotionSettings | None, val_split: int | None = None) -> str:
    """What this search promotes (after :meth:`SearchConfig.with_default_rungs`), or why it promotes nothing;
    ``val_split``: the validation split's size, to say how much of it a promotion reads."""
    if settings is not None:
        return prepare_promotion(settings, config.finetune_steps, val_split)
    if not config.promotion:
        return "Promotion: off (--no-promotion): every trial gets the brief fine-tune only"
    if config.finetune_steps <= 0:
        return "Promotion: none: with --finetune-steps 0 no trial is fine-tuned, so none has weights to continue from"
    return (
        f"Promotion: none: one epoch of the training split is no more than the brief fine-tune's "
        f"{config.finetune_steps} steps of {config.finetune_batch}, so every trial already trains on all of it; "
        f"--rungs sets longer rungs anyway"
    )


def _can_continue(trial: FrozenTrial, rung: int, settings: PromotionSettings) -> bool:
    """This worker sees the weights the trial's previous rung left (none are needed for the unpruned model)."""
    if Policy.from_dict(trial.user_attrs["policy"]).is_unpruned:
        return True
    return weights_path(settings.folder, trial.number, rung - 1).is_file()


def promote_next(
    study: optuna.Study, ctx: TrialContext, reporter: Reporter, final: bool = False
) -> dict[str, Any] | None:
    """Promote one trial that ASHA says is due and nobody else is promoting; its new rung's record, or None.

    ``final``: every trial of the study has finished, so the whole top fraction is due (before, only the best
    :data:`~search.study.rungs.EAGER_SHARE` of it).
    """
    settings = ctx.promotion
    if settings is None:
        return None
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    by_number = {t.number: t for t in trials}
    due = promotable(trials, study.user_attrs, settings.rung_steps, settings.fraction, final=final)
    for number, rung in due:
        trial = by_number[number]
        if not _can_continue(trial, rung, settings):
            continue
        claim = claim_promotion(rdb_storage(study), study, number, rung)
        if claim is None:
            continue
        if len(stored_rungs(study.user_attrs, number)) >= rung:  # finished by a worker that died before 'done'
            claim.done()
            continue
        if claim.taken_over:
            reporter.info(f"Taking over the promotion of trial {number} to rung {rung}: {claim.taken_over}")
        record = _promote(study, trial, rung, ctx, settings, claim, reporter)
        if record is not None:
            return record
    return None


def promote_all(
    study: optuna.Study,
    ctx: TrialContext,
    reporter: Reporter,
    deadline: float | None = None,
    trials: int | None = None,
) -> int:
    """Promote until nothing is due (or ``deadline``, a ``time.monotonic()`` value, passes); how many were.

    ``trials``: the study's ``--trials``; the whole top fraction is due once that many have finished and none is
    running on another worker (None: now).
    """
    done = 0
    while deadline is None or time.monotonic() < deadline:
        if promote_next(study, ctx, reporter, final=trials is None or _all_finished(study, trials)) is None:
            break
        done += 1
    return done


def _all_finished(study: optuna.Study, trials: int) -> bool:
    """Every trial of the study has finished: no more results will come to rank the promotions among."""
    now = progress(study)
    return now.done(trials) and now.running == 0


def _promote(
    study: optuna.Study,
    trial: FrozenTrial,
    rung: int,
    ctx: TrialContext,
    settings: PromotionSettings,
    claim: Claim,
    reporter: Reporter,
) -> dict[str, Any] | None:
    """Run the claimed promotion; None when it failed (recorded on the claim, not tried again)."""
    try:
        record = _run(trial, rung, ctx, settings, reporter, stored_rungs(study.user_attrs, trial.number), claim.held)
    except ClaimLost:
        return _left_to_its_new_holder(trial, rung, reporter)
    except Exception as exc:  # e.g. a weights file that cannot be read: the search goes on without this rung
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        claim.failed(message)
        reporter.warn(f"promoting trial {trial.number} to rung {rung} failed: {message}")
        return None
    except BaseException:  # Ctrl-C, a stop by the launcher: a rerun takes the claim over at once
        claim.stopped()
        raise
    if not claim.held():  # silent too long: another worker took this promotion over and records it
        return _left_to_its_new_holder(trial, rung, reporter)
    try:
        study.set_user_attr(rung_key(trial.number), [*stored_rungs(study.user_attrs, trial.number)[: rung - 1], record])
    except Exception as exc:  # the database, for a moment (busy, unreachable): not the promotion's fault
        claim.stopped()  # a rerun, or another worker, takes it over and redoes the rung from its saved weights
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        reporter.warn(f"could not record trial {trial.number}'s rung {rung} ({message}); it will be redone")
        return None
    except BaseException:
        claim.stopped()
        raise
    claim.done()
    refresh_note(study, trial)
    reporter.info(_line(trial, record, study))
    return record


def _left_to_its_new_holder(trial: FrozenTrial, rung: int, reporter: Reporter) -> None:
    reporter.warn(f"another worker took over promoting trial {trial.number} to rung {rung}; leaving it to it")


def _run(
    trial: FrozenTrial,
    rung: int,
    ctx: TrialContext,
    settings: PromotionSettings,
    reporter: Reporter,
    earlier: list[dict[str, Any]] | None = None,
    held: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Fine-tune trial ``trial`` on from its previous rung to ``rung``'s total steps and score it on val (all of it,
    or the fixed subset ``settings.val_images`` names).

    ``held`` says whether this worker still holds the promotion's claim; it is asked before the new weights
    replace the rung's file, and :class:`ClaimLost` is raised when another worker took the promotion over.

    The unpruned model is never fine-tuned, so once it has been read on all of val it is not read again: the
    record of its previous rung stands for this one (rung 0's when the trial itself read every image).
    """
    attrs = trial.user_attrs
    policy = Policy.from_dict(attrs["policy"])
    if policy.is_unpruned:
        reused = _unpruned_reuse(trial, rung, earlier or [])
        if reused is not None:
            return reused
    total = settings.rung_steps[rung - 1]
    seconds: dict[str, float] = {}
    model = copy.deepcopy(ctx.baseline)
    continued: dict[str, Any] | None = None
    steps = 0
    if not policy.is_unpruned:  # the unpruned model is never fine-tuned: only read on more images
        reporter.phase(f"promote trial {trial.number} to rung {rung}: rebuild")
        replay(model, attrs["pruning_history"], ctx.data.example_input())
        source = weights_path(settings.folder, trial.number, rung - 1)
        saved = load_weights_into(model, source, attrs.get("arch_hash"))
        steps = int(saved["steps"])
        continued = {"rung": rung - 1, "steps": steps, "weights_sha256": file_sha256(source)}
        extra = max(0, total - steps)
        train_settings = dataclasses.replace(ctx.finetune, steps=extra, seed=trial.number + 1000 * rung)
        description = f"promote trial {trial.number} to rung {rung}"
        reporter.phase(description)
        teacher = ctx.baseline
        result = train(model, ctx.data, train_settings, teacher=teacher, reporter=reporter, description=description)
        seconds["finetune"] = result.seconds
        steps += result.steps
        target = weights_path(settings.folder, trial.number, rung)
        if held is not None and not held():
            raise ClaimLost(f"trial {trial.number}'s rung {rung}")
        save_weights(target, model, steps=steps, arch_hash=attrs.get("arch_hash"))
    size = len(ctx.data.split("val"))
    limit = subset_limit(size, settings.val_images)
    reporter.phase(f"promote trial {trial.number} to rung {rung}: evaluate on {_images_read(limit, size)}")
    correct, extra_record = _score(model, ctx, policy.precision, seconds, limit)
    record = accuracy_record(correct.tolist(), whole_split=limit is None)
    return {
        "rung": rung,
        "steps": steps,
        "accuracy": float(correct.mean()),
        **record,
        **({} if limit is None else {"order": SUBSET_ORDER}),
        **extra_record,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "continued_from": continued,
        "worker": worker_identity(),
        "finished_at": time.time(),
    }


def _unpruned_reuse(trial: FrozenTrial, rung: int, earlier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unpruned trial's record at ``rung`` copied from its previous rung when that one read all of val."""
    if rung >= 2:
        previous = earlier[rung - 2] if len(earlier) >= rung - 1 else None
    else:
        record = trial.user_attrs.get("accuracy_record")
        # Read on every image in the split's own order (only such a read is marked so): what a promotion reads.
        complete = isinstance(record, dict) and record.get("per_image") and record.get("order") == SPLIT_ORDER
        previous = {"steps": 0, "accuracy": float(trial.values[0]), **record} if complete else None
    if previous is None:
        return None
    return {
        **previous,
        "rung": rung,
        "seconds": {},
        "continued_from": None,
        "reused_from_rung": rung - 1,
        "worker": worker_identity(),
        "finished_at": time.time(),
    }


def _score(
    model: nn.Module, ctx: TrialContext, precision: str, seconds: dict[str, float], limit: int | None
) -> tuple[Any, dict]:
    """Per-image top-1 on the validation split (``limit``: a fixed subset): of the INT8 model in ONNX Runtime for
    ``int8``."""
    started = time.perf_counter()
    if precision != "int8":
        correct = top1_correct(model, ctx.data, "val", limit=limit, device=ctx.finetune.device)
        seconds["evaluate"] = time.perf_counter() - started
        return correct, {}
    fp32 = float(top1_correct(model, ctx.data, "val", limit=limit, device=ctx.finetune.device).mean())
    quantized = quantize_model(model, ctx.data, ctx.quantize)
    seconds["quantize"] = quantized.seconds
    correct = onnx_top1_correct(quantized.int8_onnx, ctx.data, "val", limit=limit)
    seconds["evaluate"] = time.perf_counter() - started - quantized.seconds
    return correct, {"accuracy_fp32": fp32, "evaluated_in": "onnxruntime"}


def _line(trial: FrozenTrial, record: dict[str, Any], study: optuna.Study) -> str:
    reached = trial_rungs(trial, study.user_attrs)
    before = next((r for r in reached if r.rung == record["rung"] - 1), None)
    low, high = record["interval"]
    was = ""
    if before is not None:
        images = f" on {before.images} images" if before.images else ""
        was = f"; rung {before.rung}: {before.accuracy:.4f}{images} after {before.steps} steps"
    took = sum(record["seconds"].values())
    read = f"a fixed {record['images']}" if record.get("order") == SUBSET_ORDER else f"all {record['images']}"
    if "reused_from_rung" in record:
        return (
            f"Promoted trial {trial.number} (the unpruned model, never fine-tuned) to rung {record['rung']}: its rung "
            f"{record['reused_from_rung']} reading on all {record['images']} validation images stands, nothing rerun"
        )
    return (
        f"Promoted trial {trial.number} to rung {record['rung']} ({record['steps']} fine-tune steps): "
        f"top-1 {record['accuracy']:.4f} ±{(high - low) * 50:.1f} pp on {read} validation images"
        f"{was}, {took:.0f} s"
    )
