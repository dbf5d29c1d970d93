"""What setting a study up leaves until its first trial has run: the latency-aware recipe and the start-up samples.

Both need the latency-aware tables (:mod:`search.study.sensitivity`: every stage pruned alone, timed and
scored), the costliest part of a study's set-up (34 of the 71 s before the first trial for the shared
CIFAR-10 ResNet-18 at 25%), and neither is needed to start: the recipes that just meet the budget
(uniform, global magnitude) run first anyway. So a new study is marked ready without them
(:data:`DEFERRED` set), and once a trial has finished, the next worker to look (the creator, after its
first trial) claims this step (:mod:`search.study.claims`, so exactly one worker does it), measures the
tables, finds the latency-aware recipe that meets the budget, draws the start-up samples around the
recipes, and enqueues them; the latency-aware recipe then starts before the other waiting policies
(:func:`search.study.retry.retries_first`). Its phases are timed as creation's are, kept as
:data:`LATER_SECONDS`. Ctrl-C or a kill leaves the claim for the next run to take over; tables measured
before are kept. A search that ends before it (``--trials 1``) leaves it to the next run that goes on.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from search.latency_service.client import TargetLost
from search.progress import Reporter
from search.pruning.latency_aware import SensitivityTable, estimated_fraction, path_policies
from search.pruning.policy import Policy
from search.pruning.recipes import Recipe, later_recipes
from search.study.claims import claim, rdb_storage
from search.study.clocked import clocked_measured
from search.study.config import SearchConfig
from search.study.creation_clock import CreationClock, creation_line
from search.study.creator import record_step, steps_done
from search.study.enqueue import enqueue_recipes
from search.study.origin import LATENCY_AT_CREATION
from search.study.sensitivity import measure_sensitivity, tables_line
from search.study.trial import BASELINE_RECORD, READ_ENGINE, TrialContext

__all__ = ["CLAIM_KEY", "DEFERRED", "LATENCY_AWARE", "LATER", "LATER_SECONDS", "due", "finish_later_setup"]

DEFERRED = "later_setup"
"""Study user attribute: True when creation left the latency-aware recipe and the start-up samples for later."""

LATER = "latency-aware recipe and start-up samples enqueued"
"""The creation step recorded once they are (:func:`search.study.creator.record_step`)."""

LATENCY_AWARE = "latency-aware tables measured"
"""The step recorded once the tables are stored (a run taking the step over keeps them)."""

CLAIM_KEY = "setup:later"
"""The claim (a study user attribute, :mod:`search.study.claims`) of the worker doing it."""

WHEN = "after the first trial"

LATER_SECONDS = "setup_after_first_trial_seconds"
"""Study user attribute: its phases' seconds, as :data:`search.study.creation_clock.CREATION_SECONDS`."""


def due(study: optuna.Study) -> bool:
    """Whether the step is left to do and a trial has finished (so a worker may do it now)."""
    if not study.user_attrs.get(DEFERRED) or LATER in steps_done(study):
        return False
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return bool(study.get_trials(deepcopy=False, states=finished))


def finish_later_setup(study: optuna.Study, ctx: TrialContext, config: SearchConfig, reporter: Reporter) -> bool:
    """Do the step if it is due and this worker claims it; whether it did.

    Ctrl-C (or a lost latency target) releases the claim for the next run and propagates. Any other error is
    said in one line and recorded on the claim, which is then not taken again: the search goes on with the
    recipes it has and the sampler, rather than failing each rerun before its first trial."""
    if not due(study):
        return False
    held = claim(rdb_storage(study), study, CLAIM_KEY)
    if held is None:  # another worker does it (or did it, or it failed for good)
        return False
    try:
        if LATER in steps_done(study):  # done by another worker between the check above and the claim
            held.done()
            return False
        if held.taken_over:
            reporter.info(f"Finishing the set-up after the first trial: {held.taken_over}")
        clock = CreationClock(reporter, attr=LATER_SECONDS, when=WHEN)
        clock.attach(study)
        try:
            recipes = _later(study, ctx, config, reporter, clock)
            if not held.held():  # silent too long, and taken over: that worker enqueues them
                reporter.warn("another worker took over the set-up after the first trial; leaving it to that one")
                return False
            enqueue_recipes(study, ctx.space, recipes, ctx.budget_ms, chosen_at=f"the set-up {WHEN}")
            record_step(study, LATER)
            clock.settle()
        finally:
            clock.stop()
    except (KeyboardInterrupt, TargetLost):
        held.stopped()
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        held.failed(message)
        reporter.warn(
            f"the set-up after the first trial failed ({message}); the search goes on without the latency-aware "
            "recipe and the start-up samples near the budget"
        )
        return False
    held.done()
    line = creation_line(study, attr=LATER_SECONDS, when=WHEN)
    if line:
        reporter.info(line)
    return True


def _later(
    study: optuna.Study, ctx: TrialContext, config: SearchConfig, reporter: Reporter, clock: CreationClock
) -> list[Recipe]:
    """The latency-aware recipe and the start-up samples (:func:`search.pruning.recipes.later_recipes`)."""
    meter, space = ctx.meter, ctx.space
    assert meter.baseline_ms is not None
    anchors, known, labels = _enqueued(study, ctx)
    tables: list[SensitivityTable] = []

    def latency_aware_grid_of(precision: str) -> list[tuple[float, Policy]]:
        if not tables and LATENCY_AWARE in steps_done(study):  # measured before the step was interrupted
            tables.append(SensitivityTable.from_dict(study.user_attrs["latency_aware"]))
            reporter.info("Latency-aware tables: kept from before")
        if not tables:
            with clock.phase("latency-aware tables"):
                reporter.phase("measure each stage pruned alone (latency-aware recipe)")
                table = measure_sensitivity(
                    space,
                    meter.baseline,
                    meter,
                    bn_batches=config.bn_batches,
                    val_images=config.val_images,
                    device=config.device,
                    reporter=reporter,
                    baseline_record=study.user_attrs.get(BASELINE_RECORD),
                    engine=study.user_attrs.get(READ_ENGINE),
                )
            tables.append(table)
            study.set_user_attr("latency_aware", table.to_dict())
            record_step(study, LATENCY_AWARE)
            reporter.info(tables_line(table))
        return path_policies(space, tables[0], precision)

    measured = clocked_measured(meter, clock, known)
    found = later_recipes(
        space,
        ctx.budget_ms,
        measured,
        reporter,
        anchors,
        seed=config.seed,
        latency_aware_grid_of=latency_aware_grid_of,
        phase=clock.phase,
        estimate_of=lambda policy: estimated_fraction(tables[0], space, policy) if tables else None,
    )
    for recipe in found:  # enqueueing it again would be skipped: say so, not "enqueued" alone
        if recipe.label and recipe.policy.key() in labels:
            reporter.info(f"The {recipe.label} recipe is the policy of {labels[recipe.policy.key()]!r}, queued already")
    return found


def _enqueued(study: optuna.Study, ctx: TrialContext) -> tuple[list[Policy], dict[str, dict[str, Any]], dict[str, str]]:
    """The budget-matched recipes creation enqueued (the start-up samples' anchors), every latency record creation
    measured to choose a recipe (not measured again), and each recipe's label, the last two by policy key."""
    anchors: list[Policy] = []
    known: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for trial in study.get_trials(deepcopy=False):
        label = trial.user_attrs.get("recipe")
        if not label:
            continue
        # As enqueued: a running trial's params fill in one suggestion at a time.
        params = trial.system_attrs.get("fixed_params") or trial.params
        policy = ctx.space.suggest(optuna.trial.FixedTrial(params))
        new = policy.key() not in labels
        labels.setdefault(policy.key(), label)
        if new and label.endswith("at the budget") and not label.startswith("latency-aware"):
            anchors.append(policy)  # the latency-aware recipe is found again (a rerun after a kill) and added then
        if trial.user_attrs.get(LATENCY_AT_CREATION) is not None:
            known[policy.key()] = trial.user_attrs[LATENCY_AT_CREATION]
    return anchors, known, labels
