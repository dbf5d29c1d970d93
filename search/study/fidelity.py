"""What the sampler learns from: each trial's highest rung, on rung 0's scale.

A finished Optuna trial's values cannot change, so each trial's own values stay those of rung 0
(the brief fine-tune). Promotion reads its best trials again after a longer fine-tune, a better
signal of how they rank; but their raw accuracy there is higher for being trained longer, and a
sampler fed that raw accuracy would favour whatever happened to be promoted.

So the sampler sees, for each trial promoted to rung R (fine-tuned there), its rung-R accuracy
minus the mean gain from rung 0 to rung R of all trials fine-tuned at rung R. Promoted trials keep
their mean rung-0 level, so they are not favoured for the longer fine-tune, while among themselves,
and against the trials they beat or lost to at rung 0, they are placed by the better signal: one
that gained less than the others from the longer fine-tune (it ranked high at rung 0 by the noise
of 2,000 images, say) now looks worse than it did. Trials at rung 0 keep their values; the unpruned
model, never fine-tuned, keeps its own; a trial that copied an earlier trial's result follows it.

Torch-free, and computed once per trial (:class:`search.study.coordination.TrialSeededSampler`
reads it in ``before_trial``); the latency objective is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.study.rungs import trial_rungs

__all__ = ["LearningView", "learned_accuracies", "rung_gains"]


def _trained(trial: FrozenTrial, study_attrs: Mapping[str, Any]) -> list[tuple[int, float]]:
    """``(rung, accuracy)`` of each rung above 0 that fine-tuned ``trial`` further, after its rung-0 accuracy."""
    reached = trial_rungs(trial, study_attrs)
    if not reached:
        return []
    out = [(0, reached[0].accuracy)]
    for r in reached[1:]:
        if r.steps > reached[0].steps:  # the unpruned model's rungs copy its one read: no fine-tune behind them
            out.append((r.rung, r.accuracy))
    return out


def _trained_by_trial(
    trials: Iterable[FrozenTrial], study_attrs: Mapping[str, Any]
) -> dict[int, list[tuple[int, float]]]:
    """:func:`_trained` of every complete trial that ran its own policy (not a copy of an earlier result)."""
    return {
        t.number: _trained(t, study_attrs)
        for t in trials
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
    }


def _mean_gains(trained: Mapping[int, list[tuple[int, float]]]) -> dict[int, float]:
    gains: dict[int, list[float]] = {}
    for reached in trained.values():
        for rung, accuracy in reached[1:]:
            gains.setdefault(rung, []).append(accuracy - reached[0][1])
    return {rung: sum(g) / len(g) for rung, g in gains.items()}


def rung_gains(trials: Iterable[FrozenTrial], study_attrs: Mapping[str, Any]) -> dict[int, float]:
    """Rung -> the mean accuracy gain from rung 0 to it over the trials fine-tuned there."""
    return _mean_gains(_trained_by_trial(trials, study_attrs))


def learned_accuracies(trials: Sequence[FrozenTrial], study_attrs: Mapping[str, Any]) -> dict[int, float]:
    """Trial number -> the accuracy the sampler sees, for the trials where it is not their own value.

    Those are the trials fine-tuned above rung 0 (their highest such rung's accuracy less that rung's
    mean gain, :func:`rung_gains`) and the trials that copied one of their results (``duplicate_of``).
    """
    trained = _trained_by_trial(trials, study_attrs)
    gains = _mean_gains(trained)
    out = {number: r[-1][1] - gains[r[-1][0]] for number, r in trained.items() if len(r) > 1}
    for t in trials:
        original = t.user_attrs.get("duplicate_of")
        if t.state == TrialState.COMPLETE and original in out:
            out[t.number] = out[original]
    return out


class LearningView:
    """``study`` as a sampler reads it: each trial in ``accuracies`` carries that accuracy as its first value.

    Everything else (directions, storage, running trials, system attributes) is the study's own; the
    trials handed out are copies, so nothing the sampler sees is written back.
    """

    def __init__(self, study: optuna.Study, accuracies: Mapping[int, float]) -> None:
        self._study = study
        self._accuracies = dict(accuracies)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _swap(self, trial: FrozenTrial) -> FrozenTrial:
        learned = self._accuracies.get(trial.number)
        if learned is None or trial.values is None:
            return trial
        out = copy.copy(trial)
        out.values = [learned, *trial.values[1:]]
        return out

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        found = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [self._swap(t) for t in found]

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [self._swap(t) for t in self._study.get_trials(deepcopy=deepcopy, states=states)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()
