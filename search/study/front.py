"""What a study found: its rows, its Pareto front, the recommended policy, and a trial by number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from search.errors import UsageError
from search.pruning.policy import Policy
from search.study.retry import failure_reason

__all__ = ["Row", "finished_trial", "pareto_front", "pick_best", "recommended", "rows"]


@dataclass(frozen=True)
class Row:
    """One finished trial, as the reports show it."""

    number: int
    accuracy: float | None
    """Top-1 after the brief fine-tune (the baseline's own for the unpruned policy); None if not evaluated."""
    accuracy_before: float | None
    latency_ms: float
    """Drift-corrected median latency: ratio to the interleaved baseline times the study's baseline."""
    ratio: float
    p90_ms: float
    macs: int
    params: int
    feasible: bool
    recipe: str | None
    policy: Policy

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8`` (the policy's; latency and accuracy were measured in it)."""
        return self.policy.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "accuracy": self.accuracy,
            "accuracy_before": self.accuracy_before,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.ratio,
            "p90_ms": self.p90_ms,
            "macs": self.macs,
            "params": self.params,
            "feasible": self.feasible,
            "recipe": self.recipe,
            "precision": self.precision,
            "policy": self.policy.to_dict(),
        }


def rows(study: optuna.Study) -> list[Row]:
    """Every completed trial of the study, in trial order."""
    result = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        evaluated = a.get("fine_tuned") or Policy.from_dict(a["policy"]).is_unpruned  # unpruned: FP32 or INT8 baseline
        result.append(
            Row(
                number=t.number,
                accuracy=float(t.values[0]) if evaluated else None,
                accuracy_before=a.get("accuracy_before"),
                latency_ms=float(t.values[1]),
                ratio=float(a["latency"]["ratio"]),
                p90_ms=float(a["latency"]["p90_ms"])
                * float(a["latency"]["corrected_ms"])
                / float(a["latency"]["median_ms"]),
                macs=int(a.get("macs", 0)),
                params=int(a.get("params", 0)),
                feasible=bool(a.get("feasible")),
                recipe=a.get("recipe"),
                policy=Policy.from_dict(a["policy"]),
            )
        )
    return result


def pareto_front(all_rows: list[Row], *, feasible_only: bool = True) -> list[Row]:
    """Rows no other row beats on both accuracy and latency, fastest first."""
    candidates = [r for r in all_rows if r.accuracy is not None and (r.feasible or not feasible_only)]
    front = []
    for r in candidates:
        dominated = any(
            o.accuracy >= r.accuracy
            and o.latency_ms <= r.latency_ms  # type: ignore[operator]
            and (o.accuracy > r.accuracy or o.latency_ms < r.latency_ms)  # type: ignore[operator]
            for o in candidates
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.latency_ms)


def recommended(all_rows: list[Row]) -> Row | None:
    """The most accurate policy within the budget (the faster one on a tie)."""
    feasible = [r for r in all_rows if r.feasible and r.accuracy is not None]
    if not feasible:
        return None
    return max(feasible, key=lambda r: (r.accuracy, -r.latency_ms))


def finished_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` if it completed, with a one-line error otherwise."""
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise UsageError(f"study {study.study_name!r} has no trial {number} (it has trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state == TrialState.FAIL:
        raise UsageError(f"trial {number} {failure_reason(trials, trial)}; pick a completed trial")
    if trial.state != TrialState.COMPLETE:
        raise UsageError(f"trial {number} is {trial.state.name.lower()}, not finished; pick a completed trial")
    if "pruning_history" not in trial.user_attrs:
        raise UsageError(f"trial {number} has no stored pruning history (made by an older version); rerun it")
    return trial


def pick_best(study: optuna.Study) -> int:
    """The recommended trial: the most accurate one within the budget."""
    all_rows = rows(study)
    best = recommended(all_rows)
    if best is None:
        budget = float(study.user_attrs["budget_ms"])
        nearest = sorted(all_rows, key=lambda r: r.latency_ms)[:3]
        listed = ", ".join(f"trial {r.number} at {r.latency_ms:.2f} ms" for r in nearest) or "none"
        raise UsageError(
            f"no trial of study {study.study_name!r} is within its {budget:g} ms budget (fastest: {listed}); "
            f"run more trials or export one with --trial N"
        )
    return best.number
