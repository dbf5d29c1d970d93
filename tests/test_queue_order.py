"""Which waiting trial a worker starts next: a retry, then a recipe measured within the budget, then the oldest."""

from __future__ import annotations

import optuna

from search.study.origin import LATENCY_AT_CREATION
from search.study.retry import RETRY_OF, retries_first


def _study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("budget_ms", 10.0)
    return study


def _enqueue(study: optuna.Study, x: float, **attrs: object) -> None:
    study.enqueue_trial({"x": x}, user_attrs=attrs)


def _next_x(study: optuna.Study) -> float:
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 10.0)
    study.tell(trial, [x, x])
    return x


def test_a_recipe_measured_within_the_budget_starts_before_older_waiting_trials_and_a_retry_before_it() -> None:
    study = _study()
    _enqueue(study, 1.0, recipe="unpruned")  # over the budget, or never measured: its place in the line
    _enqueue(study, 2.0, recipe="uniform 0.2 l1", **{LATENCY_AT_CREATION: {"corrected_ms": 14.0}})  # measured over
    _enqueue(study, 3.0, start="near the budget", **{LATENCY_AT_CREATION: {"corrected_ms": 9.0}})  # a sample: no recipe
    _enqueue(study, 4.0, recipe="latency-aware l1 at the budget", **{LATENCY_AT_CREATION: {"corrected_ms": 9.5}})
    _enqueue(study, 5.0, recipe="unpruned", **{RETRY_OF: 0})
    retries_first(study)
    assert [_next_x(study) for _ in range(5)] == [5.0, 4.0, 1.0, 2.0, 3.0]


def test_without_a_budget_on_the_study_only_retries_jump_the_line() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    _enqueue(study, 1.0, recipe="unpruned")
    _enqueue(study, 2.0, recipe="uniform 0.5 l1 at the budget", **{LATENCY_AT_CREATION: {"corrected_ms": 1.0}})
    retries_first(study)
    assert [_next_x(study) for _ in range(2)] == [1.0, 2.0]
