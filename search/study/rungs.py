"""Each trial's accuracy at every rung it reached, and which trials the next rung should get (ASHA).

Rung 0 is the trial itself: the brief fine-tune (``--finetune-steps``) read on ``--val-images``.
A promoted trial's higher rungs are kept in the study user attribute ``rung:N`` (a list, one entry
per rung above 0, in order): the total fine-tune steps behind it, the accuracy, the images it was
read on with its Wilson interval and per-image record, and the seconds it took. The trial's own
values stay those of rung 0, the fidelity every trial reached; the sampler learns from the highest
rung on rung 0's scale (:mod:`search.study.fidelity`).

Torch-free: the reports read these records without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.pruning.policy import Policy
from search.study.confirm import confirmed_record
from search.study.uncertainty import SPLIT_ORDER

__all__ = [
    "EAGER_SHARE",
    "FEWEST_PROMOTED",
    "RUNG_PREFIX",
    "PromotionSettings",
    "Rung",
    "highest_rung",
    "promotable",
    "rung_key",
    "stored_rungs",
    "trial_rungs",
]

RUNG_PREFIX = "rung:"
"""Study user attribute ``rung:N``: trial N's records at the rungs above 0."""


@dataclass(frozen=True)
class PromotionSettings:
    """How a search promotes its best trials to longer fine-tunes."""

    rung_steps: tuple[int, ...]
    """Total fine-tune steps at rungs 1, 2, ... (rung 0 is ``--finetune-steps``)."""
    fraction: float
    """The best this fraction of the trials at a rung go on to the next (ASHA's 1/eta)."""
    folder: Path
    """Where each trial's fine-tuned weights are kept (``trial-N/rung-R.pt``)."""
    val_images: int | None = None
    """Validation images a promotion reads: a fixed subset of this many, or the whole split when it has no more
    (None: always the whole split); ``--rung-val-images``."""


EAGER_SHARE = 0.5
"""While the study still has trials to run, only the best ``fraction * EAGER_SHARE`` of the trials finished so far
are promoted (the top eighth at the default quarter); the rest of the top ``fraction`` wait for the study's last trial.
Plain asynchronous ASHA ranks each trial among the few finished so far, and later trials keep displacing earlier
ones: on the equal-compute benchmark's studies it promoted 12 of 26 trials (ResNet-18 CIFAR at 25%) and 14 of 26
(MobileNetV2, GPSampler) where the top third at the end was 8. Replaying those studies (BENCHMARKS.md, "Promotion
while the study runs"), half the share while trials run promoted 8 and 9, with the same pick or one tied with it."""


FEWEST_PROMOTED = 2
"""Once every trial has finished, at least this many of a rung's trials go on to the next (where it has that many),
however small the fraction: a top rung holding one trial would have nothing to compare it with, and the
recommendation's tie rule nothing to say. With the default quarter it binds below 12 trials at a rung."""


def rung_key(number: int) -> str:
    return f"{RUNG_PREFIX}{number}"


@dataclass(frozen=True)
class Rung:
    """One trial's accuracy at one rung, with what it was read on."""

    rung: int
    steps: int
    """Fine-tune steps behind this accuracy, in total (rung 0's plus every promotion's)."""
    accuracy: float
    images: int | None
    per_image: str | None
    seconds: float | None = None
    order: str | None = None
    """How the images were ordered (:data:`search.study.uncertainty.SPLIT_ORDER`; ``SUBSET_ORDER``: a promotion's
    fixed subset, ``--rung-val-images``; None: rung 0's shuffled subset, or a rung-0 read of a study made before
    the split's own order existed); only records of one order pair."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "steps": self.steps,
            "accuracy": self.accuracy,
            "images": self.images,
            "seconds": self.seconds,
        }


def stored_rungs(study_attrs: Mapping[str, Any], number: int) -> list[dict[str, Any]]:
    """Trial ``number``'s records at rungs above 0, as stored (in rung order)."""
    found = study_attrs.get(rung_key(number))
    return [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []


def _rung0(trial: FrozenTrial) -> Rung | None:
    a = trial.user_attrs
    if trial.values is None or "policy" not in a:
        return None
    if not (a.get("fine_tuned") or Policy.from_dict(a["policy"]).is_unpruned):  # unpruned: the baseline's own
        return None
    record = a.get("accuracy_record") if isinstance(a.get("accuracy_record"), dict) else {}
    seconds = a.get("seconds") or {}
    spent = sum(float(seconds.get(k, 0.0)) for k in ("finetune", "evaluate", "bn_recalibration", "quantize"))
    return Rung(
        rung=0,
        steps=int((a.get("finetune") or {}).get("steps", 0)) if a.get("fine_tuned") else 0,
        accuracy=float(trial.values[0]),
        images=int(record["images"]) if record.get("images") else None,
        per_image=record.get("per_image"),
        seconds=round(spent, 2) if seconds else None,
        order=record.get("order"),
    )


def trial_rungs(trial: FrozenTrial, study_attrs: Mapping[str, Any]) -> list[Rung]:
    """Every rung trial ``trial`` reached, lowest first (empty when it was never evaluated)."""
    first = _rung0(trial)
    if first is None:
        return []
    out = [first]
    for r in stored_rungs(study_attrs, trial.number):
        if r.get("rung") != len(out):  # a gap would mean a lost record: stop at the last consecutive rung
            break
        out.append(
            Rung(
                rung=int(r["rung"]),
                steps=int(r["steps"]),
                accuracy=float(r["accuracy"]),
                images=int(r["images"]) if r.get("images") else None,
                per_image=r.get("per_image"),
                seconds=_total(r.get("seconds")),
                # a promotion's record names its order; one without (older studies) read the whole split in it
                order=r.get("order", SPLIT_ORDER),
            )
        )
    return out


def _total(seconds: Any) -> float | None:
    if isinstance(seconds, dict):
        return round(sum(float(v) for v in seconds.values()), 2)
    return None if seconds is None else float(seconds)


def highest_rung(trial: FrozenTrial, study_attrs: Mapping[str, Any]) -> Rung | None:
    """The highest rung ``trial`` reached (None when it was never evaluated)."""
    reached = trial_rungs(trial, study_attrs)
    return reached[-1] if reached else None


def _eligible(trial: FrozenTrial) -> bool:
    """Complete, within the budget, evaluated, and not a copy of an earlier trial's result."""
    a = trial.user_attrs
    return trial.state == TrialState.COMPLETE and bool(a.get("feasible")) and "duplicate_of" not in a


def promotable(
    trials: Iterable[FrozenTrial],
    study_attrs: Mapping[str, Any],
    rung_steps: Sequence[int],
    fraction: float,
    *,
    final: bool = True,
    fewest: int = FEWEST_PROMOTED,
) -> list[tuple[int, int]]:
    """``(trial number, rung it would go to)`` for every trial ASHA promotes now, highest rung first.

    At each rung ``r`` below the top, the trials with a result there are ranked by it (the faster
    on equal accuracy); the best ``floor(n * fraction)`` of the ``n`` that reached ``r`` go on to
    ``r + 1`` unless they already did, and at least ``fewest`` (:data:`FEWEST_PROMOTED`) of them where ``n`` is
    that many.
    ``rung_steps`` are the total steps of rungs 1, 2, ...
    ``final``: whether every trial of the study has finished; before that, only the best
    ``floor(n * fraction * EAGER_SHARE)`` are promoted (:data:`EAGER_SHARE`), with no minimum.
    Whether one is already being promoted is for the caller (the claims) to tell.
    """
    if not rung_steps:
        return []
    by_rung: dict[int, list[tuple[float, float, int, int]]] = {}
    budget_ms = study_attrs.get("budget_ms")
    for t in trials:
        if not _eligible(t):
            continue
        again = confirmed_record(study_attrs, t.number)  # when it was timed again
        if again is not None and budget_ms is not None and float(again["corrected_ms"]) > budget_ms:
            continue  # over the budget when timed again: no longer a candidate, not worth a longer fine-tune
        reached = trial_rungs(t, study_attrs)
        for r in reached:
            latency = float(t.values[1]) if t.values and len(t.values) > 1 else math.inf
            by_rung.setdefault(r.rung, []).append((-r.accuracy, latency, t.number, len(reached) - 1))
    out = []
    share = fraction if final else fraction * EAGER_SHARE
    for rung in sorted(by_rung, reverse=True):
        if rung >= len(rung_steps):
            continue
        ranked = sorted(by_rung[rung])
        keep = math.floor(len(ranked) * share + 1e-9)
        if final and len(ranked) >= fewest:
            keep = max(keep, fewest)
        out += [(number, rung + 1) for _, _, number, top in ranked[:keep] if top == rung]
    return out
