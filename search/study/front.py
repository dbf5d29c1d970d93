"""What a study found: its rows, its Pareto front, the recommended policy, and a trial by number."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from search.errors import UsageError
from search.pruning.policy import Policy
from search.study.confirm import confirmed_record, latency_lines
from search.study.retry import failure_reason
from search.study.rungs import highest_rung
from search.study.uncertainty import ALPHA, mcnemar_p, paired_counts, unpack_correct, wilson

__all__ = [
    "TIE_RULE",
    "Recommendation",
    "Row",
    "Verdict",
    "compare",
    "finished_trial",
    "pareto_front",
    "pick_best",
    "recommendation",
    "recommended",
    "rows",
]

TIE_RULE = "the fastest of the tied trials"
"""How the recommendation picks among trials the validation images cannot tell apart."""


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
    images: int | None = None
    """Validation images the accuracy was read on (None: not recorded, a study from an older version)."""
    per_image: str | None = None
    """Which of those images it got right, packed (:func:`search.study.uncertainty.pack_correct`)."""
    rung: int = 0
    """The highest rung the trial reached, which :attr:`accuracy` comes from (0: the brief fine-tune)."""
    order: str | None = None
    """How :attr:`per_image`'s images are ordered (:attr:`search.study.rungs.Rung.order`): only one order pairs."""
    steps: int | None = None
    """Fine-tune steps behind :attr:`accuracy` (None: not fine-tuned)."""
    latency_repeats: tuple[float, ...] = ()
    """The ratios of the repeats that timed the trial again in fresh processes (:mod:`search.study.confirm`);
    :attr:`latency_ms` and :attr:`ratio` are then their median. Empty: the search's one timing."""
    at_edge: bool = False
    """Timed again, the repeats fell on both sides of the budget: it meets it by the median, not every time."""
    over_when_timed_again: bool = False
    """Within the budget by the search's timing, over it by the median of the repeats: no longer a candidate."""
    budget_ms: float | None = None
    """The study's budget."""
    baseline_now_ms: float | None = None
    """Timed again: the unpruned model's median in those repeats (the study's baseline was timed at creation)."""

    @property
    def interval(self) -> tuple[float, float] | None:
        """Wilson 95% interval of the accuracy, when the number of images it was read on is known."""
        if self.accuracy is None or not self.images:
            return None
        return wilson(round(self.accuracy * self.images), self.images)

    def source(self) -> str:
        """Where :attr:`accuracy` comes from: ``rung 1: 60 fine-tune steps, 1797 validation images``."""
        steps = "not fine-tuned" if not self.steps else f"{self.steps} fine-tune steps"
        images = f", {self.images} validation images" if self.images else ""
        return f"rung {self.rung}: {steps}{images}"

    @property
    def margin(self) -> float | None:
        """Half the interval's width (the ``±`` the tables show)."""
        interval = self.interval
        return None if interval is None else (interval[1] - interval[0]) / 2

    def correct(self) -> list[bool] | None:
        if self.per_image is None or not self.images:
            return None
        try:
            return unpack_correct(self.per_image, self.images)
        except ValueError:
            return None

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
            "images": self.images,
            "rung": self.rung,
            "finetune_steps": self.steps,
            "accuracy_interval": list(self.interval) if self.interval else None,
            "latency_repeats": list(self.latency_repeats) or None,
            "latency_at_budget_edge": self.at_edge,
            "policy": self.policy.to_dict(),
        }


def rows(study: optuna.Study) -> list[Row]:
    """Every completed trial of the study, in trial order, each at the highest rung it reached."""
    result = []
    study_attrs = study.user_attrs
    budget_ms = study_attrs.get("budget_ms")
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        top = highest_rung(t, study_attrs)  # None: over the budget, never evaluated
        latency_ms, ratio = float(t.values[1]), float(a["latency"]["ratio"])
        p90_ms = float(a["latency"]["p90_ms"]) * float(a["latency"]["corrected_ms"]) / float(a["latency"]["median_ms"])
        feasible = bool(a.get("feasible"))
        again = confirmed_record(study_attrs, t.number) if feasible else None
        edge = over = False
        if again is not None and budget_ms is not None:
            p90_ms *= float(again["corrected_ms"]) / latency_ms
            latency_ms, ratio = float(again["corrected_ms"]), float(again["ratio"])
            over = latency_ms > float(budget_ms)
            edge = not over and max(again["ratios"]) * latency_ms / ratio > float(budget_ms)
            feasible = not over
        result.append(
            Row(
                number=t.number,
                accuracy=None if top is None else top.accuracy,
                accuracy_before=a.get("accuracy_before"),
                latency_ms=latency_ms,
                ratio=ratio,
                p90_ms=p90_ms,
                macs=int(a.get("macs", 0)),
                params=int(a.get("params", 0)),
                feasible=feasible,
                recipe=a.get("recipe"),
                policy=Policy.from_dict(a["policy"]),
                images=None if top is None else top.images,
                per_image=None if top is None else top.per_image,
                rung=0 if top is None else top.rung,
                order=None if top is None else top.order,
                steps=None if top is None or not (a.get("fine_tuned") or top.rung) else top.steps,
                latency_repeats=tuple(again["ratios"]) if again is not None and budget_ms is not None else (),
                at_edge=edge,
                over_when_timed_again=over,
                budget_ms=None if budget_ms is None else float(budget_ms),
                baseline_now_ms=_baseline_now(again),
            )
        )
    return result


def _baseline_now(again: dict[str, Any] | None) -> float | None:
    values = [float(v) for v in (again or {}).get("baseline_median_ms") or [] if v]
    return statistics.median(values) if values else None


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


@dataclass(frozen=True)
class Verdict:
    """The most accurate trial against another one: can the validation images tell them apart?"""

    other: Row
    tied: bool
    method: str
    """``paired`` (exact McNemar test on the same images) or ``intervals`` (overlapping Wilson intervals)."""
    p_value: float | None = None
    discordant: tuple[int, int] | None = None
    """Images right only by the most accurate trial, and right only by the other one (paired)."""
    best_rung: int | None = None
    """The rung the most accurate trial's accuracy comes from."""

    def how(self) -> str:
        if self.method == "paired":
            assert self.discordant is not None and self.p_value is not None
            a, b = self.discordant
            return (
                f"paired on the same {self.other.images} validation images: {a} right only by the more accurate, "
                f"{b} only by the other, exact McNemar p = {self.p_value:.3g}, "
                f"{'above' if self.tied else 'at or below'} {ALPHA:g}"
            )
        overlap = "overlap" if self.tied else "do not overlap"
        return f"their Wilson 95% intervals {overlap} ({_why_unpaired(self)})"


def _why_unpaired(verdict: Verdict) -> str:
    other = verdict.other
    if other.per_image is not None and verdict.best_rung is not None and verdict.best_rung != other.rung:
        return f"read at different rungs, {verdict.best_rung} and {other.rung}: not paired"
    return "no per-image record on the same images to pair"


def compare(best: Row, other: Row) -> Verdict | None:
    """Whether ``other`` is tied with ``best``; None when neither record allows telling (older studies)."""
    a, b = best.correct(), other.correct()
    if a is not None and b is not None and len(a) == len(b) and (best.rung, best.order) == (other.rung, other.order):
        only_a, only_b = paired_counts(a, b)
        p = mcnemar_p(only_a, only_b)
        return Verdict(other, p > ALPHA, "paired", p, (only_a, only_b))
    ia, ib = best.interval, other.interval
    if ia is None or ib is None:
        return None
    return Verdict(other, ia[0] <= ib[1] and ib[0] <= ia[1], "intervals", best_rung=best.rung)


@dataclass(frozen=True)
class Recommendation:
    """The recommended trial within the budget, and the trials tied with the most accurate one."""

    pick: Row
    top: Row
    """The most accurate trial within the budget (the faster one on equal accuracy)."""
    tied: list[Verdict]
    """Trials the validation images cannot tell apart from :attr:`top`."""
    runner_up: Verdict | None
    """The most accurate of the others, when it is separable from :attr:`top` (nothing is tied)."""
    not_compared: list[Row] = field(default_factory=list)
    """Trials on the front read at another rung than :attr:`top` (a shorter or longer fine-tune): their top-1
    measures another thing, so they are neither tied with it nor separable from it, and never the pick."""
    over_when_timed_again: list[Row] = field(default_factory=list)
    """Trials the search timed within the budget that the repeats put over it (:mod:`search.study.confirm`)."""

    @property
    def candidates(self) -> list[Row]:
        """The top trial and those tied with it, fastest first."""
        return sorted([self.top, *(v.other for v in self.tied)], key=lambda r: (r.latency_ms, r.number))

    def lines(self) -> list[str]:
        """What the recommendation says about ties, for the reports (empty when nothing can be told)."""
        return self._tie_lines() + self._not_compared_line() + self._latency_lines()

    def _latency_lines(self) -> list[str]:
        return latency_lines(self.pick, self.candidates, self.over_when_timed_again)

    def _not_compared_line(self) -> list[str]:
        if not self.not_compared:
            return []
        listed = ", ".join(f"{r.number} (rung {r.rung})" for r in sorted(self.not_compared, key=lambda r: r.number))
        return [
            f"Not compared with trial {self.top.number} (rung {self.top.rung}): trials {listed} on the front were "
            "read after another fine-tune, so their top-1 measures something else; promotion, or an export of each, "
            "would compare them."
        ]

    def _tie_lines(self) -> list[str]:
        if self.tied:
            numbers = ", ".join(str(r.number) for r in self.candidates)
            out = [
                f"Tied: trials {numbers} cannot be told apart on the validation images (the most accurate is "
                f"trial {self.top.number}); rule: {TIE_RULE} is recommended, trial {self.pick.number}. "
                "More --val-images, or the final fine-tune, can separate them."
            ]
            for r in self.candidates:
                out.append(f"  trial {r.number}: top-1 {_with_margin(r)} at {r.latency_ms:.2f} ms ({r.source()})")
            out += [f"  trial {v.other.number} vs {self.top.number}: {v.how()}" for v in self.tied]
            return out
        if self.runner_up is not None:
            v = self.runner_up
            return [
                f"Separable: trial {self.top.number} (top-1 {_with_margin(self.top)}) is more accurate than the "
                f"runner-up on the front, trial {v.other.number} (top-1 {_with_margin(v.other)}): {v.how()}. "
                "(A trial it beats on both top-1 and latency is no candidate, however close its top-1.)"
            ]
        return []

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.pick.number,
            "most_accurate": self.top.number,
            "rule": TIE_RULE,
            "tied": [r.number for r in self.candidates] if self.tied else [],
            "separable_from_runner_up": None if self.runner_up is None else self.runner_up.other.number,
            "not_compared": sorted(r.number for r in self.not_compared),
            "latency_repeats": list(self.pick.latency_repeats) or None,
            "at_budget_edge": self.pick.at_edge,
            "over_when_timed_again": sorted(r.number for r in self.over_when_timed_again),
        }


def _with_margin(r: Row) -> str:
    margin = r.margin
    return f"{r.accuracy:.2%}" + ("" if margin is None else f" ±{margin * 100:.1f}")


def recommendation(all_rows: list[Row]) -> Recommendation | None:
    """Among the trials within the budget: the most accurate, those tied with it, and the fastest of these.

    Only trials on the front are candidates: one that another trial within the budget beats on both
    accuracy and latency is never recommended, whatever the noise. And only trials read at the most accurate
    one's rung are compared with it: a trial that stayed at rung 0 (30 steps, say) while the top reached
    rung 1 (300) is scored by another fine-tune, so neither a tie nor a difference with it means anything
    (the unpruned model, never fine-tuned, compares at any rung).
    """
    front = pareto_front(all_rows)
    if not front:
        return None
    ranked = sorted(front, key=lambda r: (-r.accuracy, r.latency_ms, r.number))  # type: ignore[operator]
    top = ranked[0]
    others = [r for r in ranked[1:] if _same_fidelity(top, r)]
    verdicts = [compare(top, r) for r in others]
    tied = [v for v in verdicts if v is not None and v.tied]
    pick = min([top, *(v.other for v in tied)], key=lambda r: (r.latency_ms, -r.accuracy, r.number))  # type: ignore
    runner_up = verdicts[0] if verdicts and not tied and verdicts[0] is not None else None
    not_compared = [r for r in ranked[1:] if not _same_fidelity(top, r)]
    over = [r for r in all_rows if r.over_when_timed_again and r.accuracy is not None]
    return Recommendation(pick, top, tied, runner_up, not_compared, over)


def _same_fidelity(a: Row, b: Row) -> bool:
    """Whether the two trials' top-1 come from the same fine-tune (the same rung), or need none (unpruned)."""
    return a.rung == b.rung or a.policy.is_unpruned or b.policy.is_unpruned


def recommended(all_rows: list[Row]) -> Row | None:
    """The recommended policy within the budget: the most accurate, or the fastest of those tied with it."""
    found = recommendation(all_rows)
    return None if found is None else found.pick


def finished_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` if it completed, with a one-line error otherwise."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise UsageError(f"study {study.study_name!r} has no trials yet; run its search first")
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
    """The recommended trial: the most accurate within the budget, or the fastest of those tied with it."""
    all_rows = rows(study)
    best = recommended(all_rows)
    if best is None:
        budget = float(study.user_attrs["budget_ms"])
        nearest = sorted(all_rows, key=lambda r: r.latency_ms)[:3]
        listed = ", ".join(f"trial {r.number} at {r.latency_ms:.2f} ms" for r in nearest) or "none"
        again = " when timed again" if any(r.over_when_timed_again for r in all_rows) else ""
        raise UsageError(
            f"no trial of study {study.study_name!r} is within its {budget:g} ms budget{again} (fastest: {listed}); "
            f"run more trials or export one with --trial N"
        )
    return best.number
