"""A trial whose worker went silent (``kill -9``, power loss, a lost network): failed, and run again in its place.

Every running trial records a heartbeat; the next worker that looks fails one that has been silent
for the grace period (``optuna.storages.fail_stale_trials``) and hands it to the storage's
stale-trial callback, :class:`RetryStaleTrial`, which queues its policy once more (once: a retry
that dies too is a final failure). Two things differ from Optuna's own
``RetryHeartbeatStaleTrialCallback``, and both are what a user would see otherwise:

* The retry carries only what the trial was enqueued with (its params, recipe label and the
  latency record that chose it), not what the dead run had recorded. Optuna's copy carried the
  dead run's measurements and constraint, so the retry's own ``set_constraint`` was ignored, with
  a raw ``UserWarning``.
* A waiting retry starts before every other waiting trial (:func:`retries_first`). Optuna starts
  waiting trials in the order they were created, and the retry is created behind the recipes and
  start-up samples still queued, so it ran after them: past ``--trials``, since a retry is owed.
  The same holds for a policy that Ctrl-C put back (:data:`RETRY_OF`): behind a long queue it
  never ran at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.study.origin import ENQUEUED_ATTRS, LATENCY_AT_CREATION

__all__ = [
    "MAX_RETRIES",
    "RETRY_OF",
    "RetryStaleTrial",
    "failure_reason",
    "optimize_one",
    "retried_as",
    "retries_first",
    "retry_of",
]

RETRY_OF = "retry_of"
"""User attribute of a policy put back in the queue by Ctrl-C (or a lost latency target): the trial it retries."""

MAX_RETRIES = 1
"""How often a trial whose worker went silent is run again; a retry that goes silent too is a final failure."""

_CONSTRAINTS_PREFIX = "constraints"
"""Optuna keeps a trial's constraints in its system attributes under this prefix (``constraints:NAME``)."""


class RetryStaleTrial:
    """Stale-trial callback: enqueue the policy of a trial whose worker went silent, as it was enqueued."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > MAX_RETRIES:
            return
        system_attrs: dict[str, Any] = {
            **{k: v for k, v in trial.system_attrs.items() if not k.startswith(_CONSTRAINTS_PREFIX)},
            "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
            "retry_history": history,
        }
        study.add_trial(
            optuna.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={k: trial.user_attrs[k] for k in ENQUEUED_ATTRS if k in trial.user_attrs},
                system_attrs=system_attrs,
            )
        )


def retries_first(study: optuna.Study) -> None:
    """Make ``study`` start a waiting retry (of a killed or interrupted trial) before any other waiting trial, then
    a waiting recipe measured within the budget when it was chosen, then the oldest waiting trial.

    Optuna's ``Study.ask`` (which ``optimize`` calls) takes the first waiting trial it can claim;
    this puts retries at the head of that line, claimed the same way (a storage update that only
    one worker wins). The recipes known to meet the budget come next: the latency-aware one is
    enqueued once the first trial has run (:mod:`search.study.later_setup`), behind the fixed recipes
    that are often over the budget and would otherwise run first.
    """
    storage = study._storage
    take_oldest = study._pop_waiting_trial_id

    def first_in_line(trial: FrozenTrial, budget_ms: float | None) -> int | None:
        if "failed_trial" in trial.system_attrs or RETRY_OF in trial.user_attrs:
            return 0
        chosen = trial.user_attrs.get(LATENCY_AT_CREATION)
        if budget_ms is not None and trial.user_attrs.get("recipe") and chosen and chosen["corrected_ms"] <= budget_ms:
            return 1
        return None

    budget: list[float] = []  # read once: it never changes, and the study's attributes hold the large tables

    def pop_retry_first() -> int | None:
        if not budget and "budget_ms" in (attrs := study.user_attrs):
            budget.append(float(attrs["budget_ms"]))
        budget_ms = budget[0] if budget else None
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        ranks = {trial.number: first_in_line(trial, budget_ms) for trial in waiting}
        ahead = sorted((t for t in waiting if ranks[t.number] is not None), key=lambda t: (ranks[t.number], t.number))
        for trial in ahead:
            try:
                if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker took it and finished it already
                continue
        return take_oldest()

    study._pop_waiting_trial_id = pop_retry_first  # type: ignore[method-assign]


def retried_as(trials: Sequence[FrozenTrial], number: int) -> FrozenTrial | None:
    """The trial that ran trial ``number``'s policy again after its worker went silent, if any."""
    return next((t for t in trials if t.system_attrs.get("retry_history", [None])[-1] == number), None)


def retry_of(trial: FrozenTrial) -> int | None:
    """The trial whose policy ``trial`` ran again (after a Ctrl-C or a silent worker), or None for a first run."""
    if RETRY_OF in trial.user_attrs:
        return int(trial.user_attrs[RETRY_OF])
    history = trial.system_attrs.get("retry_history")
    return int(history[-1]) if history else None


def failure_reason(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> str:
    """Why a failed trial failed, in words: its error, a Ctrl-C, or a worker that went silent."""
    if "error" in trial.user_attrs:
        return f"failed ({trial.user_attrs['error']})"
    if trial.user_attrs.get("interrupted"):
        again = next((t for t in trials if t.user_attrs.get(RETRY_OF) == trial.number), None)
        return "was interrupted (Ctrl-C) and " + (f"retried as trial {again.number}" if again else "queued again")
    retry = retried_as(trials, trial.number)
    if retry is not None:
        return f"was killed (no heartbeat) and retried as trial {retry.number}"
    if "failed_trial" in trial.system_attrs:
        return (
            f"was killed (no heartbeat) as the retry of trial {trial.system_attrs['failed_trial']}, "
            "and not retried again"
        )
    return "failed (no error recorded)"


def optimize_one(study: optuna.Study, objective: Any, mine: list[optuna.trial.FrozenTrial]) -> bool:
    """One trial through ``study.optimize`` (the storage heartbeat), appended to ``mine`` when it ends here.

    False when another worker marked the trial failed while it ran (its heartbeat was late: a database that
    was away for a moment, a suspended worker): it was queued again there, and this worker goes on.
    """
    try:
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            gc_after_trial=False,
            callbacks=[lambda _study, trial: mine.append(trial)],
        )
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    except ValueError as exc:  # Optuna telling the trial FAIL, as another worker already did
        if not str(exc).startswith("Cannot tell a"):
            raise
        return False
    return True
