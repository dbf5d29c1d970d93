"""How several workers share one study: who creates it, who may join, and when the study is done.

Any number of processes, on one machine or many, may run ``cli.py search`` against the same
storage URL and study name. This module holds the rules they follow, all through the storage:

* **Creation.** A worker that finds no study creates it at once; the storage's unique study name
  makes exactly one creator win. The winner measures the baseline, records its settings,
  enqueues the recipes and finally sets the ``ready`` attribute, keeping a heartbeat on the study
  meanwhile. Everyone else waits for ``ready`` while that heartbeat is fresh, and takes creation
  over once it is not (:mod:`search.study.creator`).
* **Joining.** A worker joins only if its hardware fingerprint equals the study's
  (:func:`check_same_hardware`): latency measured on other hardware is not comparable.
* **Heartbeat.** The study fixes its heartbeat interval when it is created; every worker uses that
  value (:func:`use_study_heartbeat`), so they agree on when a silent trial is stale. A stale trial
  is failed and its policy enqueued once more, to run next (:mod:`search.study.retry`).
* **Counting.** The study is done when it has ``trials`` finished trials, not counting trials that
  were interrupted or went stale and were retried, nor sampled policies that were measured over
  the budget (they cost seconds, not a fine-tune; at most ``OVER_BUDGET_FACTOR`` times ``trials``
  of them before the study stops anyway). A worker starts a trial only while finished plus
  running trials are below the target (:func:`next_step`), so several workers overshoot the total
  only when they start trials in the same instant (by at most one trial per extra worker), or
  when a retry is still owed once the count is reached (it runs: its policy is never dropped).
* **Sampling.** :class:`TrialSeededSampler` seeds TPE from the study seed and the trial number,
  so two workers sampling at the same moment do not propose the same random policy.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search.errors import UsageError
from search.measuring.hardware import fingerprint_id
from search.measuring.runtimes.registry import DEFAULT_RUNTIME
from search.study.fidelity import LearningView, learned_accuracies
from search.study.origin import is_enqueued
from search.study.storage import HEARTBEAT_SECONDS

__all__ = [
    "OVER_BUDGET_FACTOR",
    "READY_ATTR",
    "StudyProgress",
    "TrialSeededSampler",
    "check_same_hardware",
    "check_same_runtime",
    "mark_ready",
    "next_step",
    "progress",
    "use_study_heartbeat",
    "worker_identity",
]

READY_ATTR = "ready"
"""Study user attribute the creating worker sets last: the study is complete and may be joined."""

HEARTBEAT_ATTR = "heartbeat_seconds"


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, process and the CPUs it may use (recorded on every trial)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0))}


# --------------------------------------------------------------------------- creation and joining


def mark_ready(study: optuna.Study, heartbeat_seconds: int) -> None:
    """Called by the creating worker once everything else is recorded and enqueued."""
    study.set_user_attr(HEARTBEAT_ATTR, heartbeat_seconds)
    study.set_user_attr(READY_ATTR, True)


def check_same_hardware(study: optuna.Study, hardware: dict[str, Any], name: str) -> None:
    """Refuse to join a study whose latencies were measured on different hardware."""
    stored = study.user_attrs.get("hardware")
    if not stored or stored == hardware:
        return
    check_same_runtime(study, hardware.get("runtime", DEFAULT_RUNTIME), name)
    differ = sorted(k for k in set(stored) | set(hardware) if stored.get(k) != hardware.get(k))
    detail = "; ".join(f"{k}: {stored.get(k)!r} in the study, {hardware.get(k)!r} here" for k in differ)
    raise UsageError(
        f"this machine's hardware fingerprint {fingerprint_id(hardware)} differs from the one study {name!r} "
        f"was measured on ({fingerprint_id(stored)}; {detail}), so its latencies would not be comparable and "
        f"this worker does not join; run it on a machine like the study's, or start a separate study with --study NEW"
    )


def check_same_runtime(study: optuna.Study, runtime: str, name: str) -> None:
    """Refuse to add latencies of another runtime to a study (as another machine's are refused)."""
    stored = study.user_attrs.get("hardware")
    was = (stored or {}).get("runtime", DEFAULT_RUNTIME)  # absent: a study made before --runtime (ONNX Runtime)
    if stored and was != runtime:
        raise UsageError(
            f"study {name!r} was timed in {was}, this run times in {runtime}; its latencies would not be comparable: "
            f"pass --runtime {was} to resume it, or start a separate study with --study NEW"
        )


def use_study_heartbeat(storage: RDBStorage, study: optuna.Study, requested: int | None) -> int:
    """Make this worker use the heartbeat the study was created with; return it in seconds."""
    value = int(study.user_attrs.get(HEARTBEAT_ATTR, HEARTBEAT_SECONDS))
    if requested is not None and requested != value:
        raise UsageError(
            f"study {study.study_name!r} uses a heartbeat of {value} s (fixed when it was created, so all "
            f"its workers agree when a trial is stale); omit --heartbeat or pass --heartbeat {value}"
        )
    storage.heartbeat_interval = value
    storage.grace_period = 2 * value
    return value


# --------------------------------------------------------------------------- counting trials


OVER_BUDGET_FACTOR = 3
"""A study stops after this many times ``trials`` sampled policies over the budget (none of which count)."""


@dataclass(frozen=True)
class StudyProgress:
    finished: int
    """COMPLETE trials plus FAIL trials that count (not interrupted, not retried after going stale),
    less the sampled policies over the budget."""
    running: int
    waiting: int
    over_budget: int = 0
    """Sampled (not enqueued) policies measured over the budget: recorded, not fine-tuned, not counted."""
    retries_waiting: int = 0
    """Waiting trials that retry a trial whose worker went silent: owed work, run even past the target."""

    def done(self, target: int) -> bool:
        """Whether the study needs no more trials: ``target`` finished, or the sampler gave up."""
        return self.finished >= target or self.gave_up(target)

    def gave_up(self, target: int) -> bool:
        """Whether the sampler has proposed so many policies over the budget that the study should stop."""
        return self.over_budget >= OVER_BUDGET_FACTOR * target


def progress(study: optuna.Study) -> StudyProgress:
    """How far the study is, as every worker counts it."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    retried |= {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    finished = running = waiting = over_budget = retries_waiting = 0
    for t in trials:
        if t.state == TrialState.COMPLETE and _sampled_over_budget(t):
            over_budget += 1
        elif t.state == TrialState.COMPLETE:
            finished += 1
        elif t.state == TrialState.FAIL:
            finished += not t.user_attrs.get("interrupted") and t.number not in retried
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
            retries_waiting += "failed_trial" in t.system_attrs
    return StudyProgress(
        finished=finished, running=running, waiting=waiting, over_budget=over_budget, retries_waiting=retries_waiting
    )


def _sampled_over_budget(trial: FrozenTrial) -> bool:
    attrs = trial.user_attrs
    return attrs.get("feasible") is False and not is_enqueued(attrs)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail trials whose worker stopped sending heartbeats (their policies are enqueued once more)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def next_step(study: optuna.Study, target: int) -> tuple[Literal["run", "wait", "done"], StudyProgress]:
    """Whether this worker should start a trial, wait for running ones, or stop.

    A retried trial still waiting is owed: another worker may have filled the count while the
    stale trial was being failed, and the retry then runs anyway (Optuna starts waiting trials
    before sampling), so a killed trial's policy is never silently dropped.
    """
    fail_stale_trials(study)
    now = progress(study)
    if now.retries_waiting and not now.gave_up(target):
        return "run", now
    if now.done(target):
        return "done", now
    if now.finished + now.running >= target:
        return "wait", now
    return "run", now


# --------------------------------------------------------------------------- sampling


def _trial_seed(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler (multi-objective TPE by default) whose random state depends on the study seed and the
    trial number.

    One sampler per process with the same seed would make workers that sample at the same time
    propose the same policy. Seeding from the trial number (which the storage hands out uniquely)
    keeps a single worker's run reproducible and gives concurrent workers different proposals;
    TPE's ``constant_liar`` additionally steers it away from policies that are still running
    (GPSampler accounts for running trials on its own). ``kind`` is one of ``tpe``, ``gp`` (GPSampler)
    and ``random``; each honours the latency constraint every trial sets (``Trial.set_constraint``).

    What it learns from is each trial's highest rung on rung 0's scale (:mod:`search.study.fidelity`),
    read once per trial in :meth:`before_trial`: a promotion finished since counts from the next trial on.
    """

    def __init__(self, seed: int, n_startup_trials: int, kind: str = "tpe") -> None:
        if kind not in ("tpe", "gp", "random"):
            raise ValueError(f"unknown sampler {kind!r}")
        self._seed = seed
        self._n_startup_trials = n_startup_trials
        self.kind = kind
        self._tpe = self._make(0)
        self._learned: dict[int, float] = {}

    def _make(self, number: int) -> optuna.samplers.BaseSampler:
        seed = _trial_seed(self._seed, number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.kind == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            if self.kind == "gp":
                return optuna.samplers.GPSampler(
                    seed=seed, n_startup_trials=self._n_startup_trials, warn_independent_sampling=False
                )
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                n_startup_trials=self._n_startup_trials,
                constant_liar=True,
            )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._make(trial.number)
        finished = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self._learned = learned_accuracies(finished, study.user_attrs) if self.kind != "random" else {}
        self._tpe.before_trial(study, trial)

    def _view(self, study: optuna.Study) -> Any:
        """``study`` with each promoted trial's accuracy as the sampler learns it (itself when none was promoted)."""
        return LearningView(study, self._learned) if self._learned else study

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(self._view(study), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(self._view(study), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._tpe.sample_independent(self._view(study), trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
