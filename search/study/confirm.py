"""The front's latencies timed again, each in fresh processes, before a policy is recommended.

A trial's latency is one timing. The search then picks, among the candidates that timing put within
the budget, the most accurate, and that is usually the one nearest the budget, where one timing's
noise decides which side of it a candidate lands (a winner's curse). Measured later in processes of
their own, the picks of equal compute's searches came out 1-7% above a 0.25 budget that their
searches had timed them within (BENCHMARKS.md "Equal compute"), and sub-millisecond models spread
3-7% between fresh processes ("Runtimes: reading the numbers").

So once the trials and promotions are done, every trial on the front within the budget is timed
``repeats`` more times, each in a fresh timing process (as ``bench --repeat`` times a shipped file),
interleaved with the unpruned model. Its latency becomes the median of those ratios times the study's
baseline latency, recorded in the study attribute ``confirmed:N`` with every repeat. A trial the
repeats put over the budget leaves the front, and the trials that this uncovers are timed again in
turn, so the recommendation always rests on confirmed latencies. A pick whose repeats fall on both
sides of the budget is flagged (:attr:`search.study.front.Row.at_edge`). The trial's own values (what
the sampler and the dashboard see) stay the first timing's: a finished trial's values cannot change.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from search.errors import UsageError
from search.progress import Reporter
from search.pruning.policy import Policy

if TYPE_CHECKING:  # the reports read confirmation records without loading the timing stack
    import optuna

    from search.measuring.candidate import CandidateMeter
    from search.study.claims import Claim
    from search.study.front import Row

__all__ = [
    "CONFIRM_PREFIX",
    "REPEATS_ENV",
    "confirm_front",
    "confirmed_record",
    "default_repeats",
    "how_timed",
    "latency_lines",
    "time_again",
    "verdict",
]

CONFIRM_PREFIX = "confirmed:"
"""Study attribute ``confirmed:N``: trial N's latency timed again (:func:`time_again`)."""
TIMING_CLAIM_PREFIX = "timing-again:"
"""Study attribute ``timing-again:N:REPEATS``: the claim of the worker timing trial N again."""
DEFAULT_REPEATS = 3
REPEATS_ENV = "PRUNE_SEARCH_CONFIRM_REPEATS"
"""Sets the default of ``--confirm-repeats`` (the test suite sets 0; its own tests pass the option)."""


def default_repeats() -> int:
    """:data:`DEFAULT_REPEATS`, or what :data:`REPEATS_ENV` sets."""
    raw = os.environ.get(REPEATS_ENV, "").strip()
    if not raw:
        return DEFAULT_REPEATS
    if not raw.isdigit() or int(raw) > 20:
        raise UsageError(f"{REPEATS_ENV}={raw!r} must be a whole number from 0 to 20; unset it for the default (3)")
    return int(raw)


def confirmed_record(study_attrs: Mapping[str, Any], number: int) -> dict[str, Any] | None:
    """Trial ``number``'s confirmation record, if it was timed again."""
    record = study_attrs.get(f"{CONFIRM_PREFIX}{number}")
    return record if isinstance(record, dict) and record.get("ratios") else None


def time_again(meter: CandidateMeter, trial: optuna.trial.FrozenTrial, repeats: int) -> dict[str, Any]:
    """Trial ``trial``'s model timed ``repeats`` times against the unpruned one: each repeat in a fresh timing
    process here; on a latency target, each a request to it (its own timing process, started once).

    The model is rebuilt from the trial's pruning history (checked against the architecture it measured)
    and exported as the search timed it (quantized for INT8).
    """
    from search.measuring.isolated import IsolatedTimer
    from search.pruning.channels import architecture_hash
    from search.pruning.groups import replay

    if meter.baseline_ms is None:
        raise ValueError("the study's baseline latency is not known yet")
    attrs = trial.user_attrs
    policy = Policy.from_dict(attrs["policy"])
    model = copy.deepcopy(meter.baseline)
    example = meter.data.example_input()
    if not policy.is_unpruned:
        replay(model, attrs["pruning_history"], example)
        arch = architecture_hash(model, tuple(example.shape[1:]))
        if attrs.get("arch_hash") and arch != attrs["arch_hash"]:
            raise RuntimeError(f"the rebuilt model has another architecture than trial {trial.number} measured")
    model.eval()
    started = time.perf_counter()
    onnx_model = meter.candidate_onnx(model, policy.precision)
    ratios: list[float] = []
    medians: list[float] = []
    references: list[float] = []
    processes: list[int | None] = []
    runs = 0
    isolated = meter.timer if isinstance(meter.timer, IsolatedTimer) else None
    try:
        for _ in range(repeats):
            if isolated is not None:
                isolated.close()  # the next timing starts a fresh process
            timed = meter.time_onnx(onnx_model)
            if timed.ratio is None:
                raise RuntimeError("a timing came back without its interleaved baseline")
            ratios.append(float(timed.ratio))
            medians.append(round(timed.median_ms, 4))
            references.append(round(float(timed.reference_median_ms or 0.0), 4))
            runs += timed.runs
            if isolated is not None:
                processes.append(isolated.pid)
    finally:
        if isolated is not None:
            isolated.close()  # no timing child left behind, whatever happened
    ratio = statistics.median(ratios)
    return {
        "ratios": [round(r, 5) for r in ratios],
        "ratio": round(ratio, 5),
        "corrected_ms": round(ratio * meter.baseline_ms, 4),
        "median_ms": medians,
        "baseline_median_ms": references,
        "searched_ratio": float(attrs["latency"]["ratio"]),
        "precision": policy.precision,
        "arch_hash": attrs.get("arch_hash"),
        "runs": runs,
        "fresh_processes": isolated is not None,
        "processes": processes,
        "measured_on": meter.timer.where,
        "runtime": meter.runtime,
        "seconds": round(time.perf_counter() - started, 2),
    }


def how_timed(record: dict[str, Any]) -> str:
    """``3 fresh processes`` (here), or ``3 requests to the latency target`` (a record from a target)."""
    n = len(record.get("ratios", []))
    if record.get("fresh_processes", True):
        return f"{n} fresh processes"
    return f"{n} requests to the latency target"


def _same_model(study_attrs: dict[str, Any], trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """A record of another trial with the same architecture and precision (a repeated policy): reused, so identical
    models never get different verdicts."""
    arch, precision = trial.user_attrs.get("arch_hash"), Policy.from_dict(trial.user_attrs["policy"]).precision
    if not arch:
        return None
    for key, record in study_attrs.items():
        if key.startswith(CONFIRM_PREFIX) and isinstance(record, dict) and record.get("ratios"):
            if record.get("arch_hash") == arch and record.get("precision") == precision:
                return {**record, "reused_from_trial": int(key[len(CONFIRM_PREFIX) :])}
    return None


def confirm_front(
    study: optuna.Study, meter: CandidateMeter, reporter: Reporter, repeats: int, deadline: float | None = None
) -> int:
    """Time every unconfirmed trial on the front within the budget again, until the front is all confirmed
    (or ``deadline``, a ``time.monotonic()`` value, passes); how many trials this worker timed.

    A trial is timed again once (a record with fewer repeats than ``repeats`` is timed again); one that cannot
    be is warned about and keeps its timing, so the loop ends: each pass records a trial or sets one aside.
    Workers on one study claim each trial (``timing-again:N:REPEATS``, :mod:`search.study.claims`), so no two
    time it at once; a worker whose every remaining trial is claimed waits for those records (a silent
    claim is taken over, as a promotion's is).
    """
    from search.study.claims import claim, rdb_storage
    from search.study.front import pareto_front, rows

    if repeats < 1:
        return 0
    done = 0
    failed: set[int] = set()  # this worker's: each trial is tried once a run; another worker, or a rerun, may retry
    while deadline is None or time.monotonic() < deadline:
        todo = [r for r in pareto_front(rows(study)) if len(r.latency_repeats) < repeats and r.number not in failed]
        if not todo:
            break
        held, waiting = None, False
        for row in reversed(todo):  # the slowest first: the most accurate, nearest the budget
            key = f"{TIMING_CLAIM_PREFIX}{row.number}:{repeats}"
            held = claim(rdb_storage(study), study, key)
            if held is not None:
                break
            if _finished_elsewhere(study, key):  # recorded by another worker since ``todo`` was read
                failed.add(row.number)
            else:
                waiting = True
        if held is None:  # every trial left is timed by another worker: wait for its records
            if waiting:
                time.sleep(WAIT_SECONDS)
            continue
        if held.taken_over:
            reporter.info(f"Taking over timing trial {row.number} again: {held.taken_over}")
        outcome = _confirm_one(study, row.number, meter, reporter, repeats, held)
        done += outcome == "timed"
        if outcome == "failed":
            failed.add(row.number)
    return done


WAIT_SECONDS = 2.0
"""How often a worker looks for the records of trials another worker is timing again."""


def _finished_elsewhere(study: optuna.Study, key: str) -> bool:
    from search.study.claims import rdb_storage, read_claim

    text = read_claim(rdb_storage(study), study._study_id, key)
    return text is not None and bool(json.loads(text).get("done"))


def _confirm_one(
    study: optuna.Study, number: int, meter: CandidateMeter, reporter: Reporter, repeats: int, held: Claim
) -> str:
    """Time trial ``number`` again under this worker's claim and record it: "timed"; "failed" (warned; the claim is
    released, so another worker or a rerun may try again); "elsewhere" (another worker took the claim over, or
    had recorded it already: its record stands)."""
    from search.latency_service.client import TargetLost
    from search.study.notes import refresh_note

    try:
        trial = study.get_trials(deepcopy=False)[number]
        own = confirmed_record(study.user_attrs, number)
        if own is not None and len(own["ratios"]) >= repeats:  # its last holder recorded it, then died
            held.done()
            return "elsewhere"
        record = _same_model(study.user_attrs, trial)
        if record is None or len(record["ratios"]) < repeats:
            reporter.phase(f"time trial {number} again ({repeats} repeats)")
            record = time_again(meter, trial, repeats)
        if not held.held():  # silent too long, and another worker took it over: its record stands
            return "elsewhere"
        own = confirmed_record(study.user_attrs, number)
        if own is None or len(own["ratios"]) < len(record["ratios"]):  # never replace a record of more repeats
            study.set_user_attr(f"{CONFIRM_PREFIX}{number}", record)
    except TargetLost:
        held.stopped()  # a rerun, or another worker, takes it over at once
        raise
    except Exception as exc:  # e.g. a runtime or a target refusing the file: the search's result stands
        held.stopped()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reporter.warn(f"could not time trial {number} again: {message}; it keeps the search's timing")
        return "failed"
    except BaseException:  # Ctrl-C: no claim is left beating
        held.stopped()
        raise
    held.done()
    refresh_note(study, trial)
    reporter.info(_line(number, record, meter.baseline_ms or 0.0, float(study.user_attrs["budget_ms"])))
    return "timed"


def verdict(record: dict[str, Any], baseline_ms: float, budget_ms: float) -> str:
    budget = budget_ms / baseline_ms if baseline_ms else 0.0
    if record["corrected_ms"] > budget_ms:
        return f"over the budget ({budget:.3f}): no longer a candidate"
    if max(record["ratios"]) * baseline_ms > budget_ms:
        return f"within the budget ({budget:.3f}) by the median, but not in every repeat"
    return f"within the budget ({budget:.3f}) in every repeat"


def _line(number: int, record: dict[str, Any], baseline_ms: float, budget_ms: float) -> str:
    ratios = record["ratios"]
    reused = (
        f", reused from trial {record['reused_from_trial']} (the same model)" if "reused_from_trial" in record else ""
    )
    return (
        f"Trial {number} timed again in {how_timed(record)}: {record['ratio']:.3f} of the baseline "
        f"(median; {min(ratios):.3f}-{max(ratios):.3f}; the search's timing {record['searched_ratio']:.3f}{reused}), "
        f"{verdict(record, baseline_ms, budget_ms)}"
    )


DRIFT_WARNING = 0.15
"""How far the unpruned model's time may move between the study's creation and the repeats before the reports say so."""


def latency_lines(pick: Row, candidates: list[Row], over: list[Row]) -> list[str]:
    """What the recommendation says about its latencies timed again: the pick at the budget's edge, a pick not
    timed again, a machine whose state changed since the study began, the trials the repeats put over the budget."""
    out = []
    if pick.at_edge:
        low, high = min(pick.latency_repeats), max(pick.latency_repeats)
        out.append(
            f"At the budget's edge: trial {pick.number}, timed again {len(pick.latency_repeats)} times, ran "
            f"{low:.3f}-{high:.3f} of the baseline (median {pick.ratio:.3f}; budget {_budget_ratio(pick):.3f}): it "
            "meets the budget by the median, not in every timing. Time it on the device with `bench --repeat 5`, or "
            "take a faster trial from the front."
        )
    if not pick.latency_repeats and any(r.latency_repeats for r in candidates + over):
        out.append(
            f"Trial {pick.number} was not timed again (the run stopped first, or its timing failed): its latency "
            "is the search's one timing. Rerun the search command to time it again."
        )
    drift = _machine_drift([*candidates, *over, pick])
    if drift is not None:
        out.append(drift)
    if over:
        listed = ", ".join(f"{r.number} ({r.ratio:.3f})" for r in sorted(over, key=lambda r: r.number))
        out.append(
            f"Over the budget when timed again (the median of the repeats, of the baseline): trials {listed}; "
            "the search's one timing had put them within it, so they are not recommended."
        )
    return out


def _machine_drift(timed: list[Row]) -> str | None:
    """A line when the unpruned model timed far from the study's baseline while the front was timed again: the
    machine's state changed, and sub-millisecond candidates' ratios move with it (BENCHMARKS.md "Front timed
    again")."""
    now = [r.baseline_now_ms for r in timed if r.baseline_now_ms and r.ratio]
    if not now:
        return None
    then = timed[0].latency_ms / timed[0].ratio
    moved = statistics.median(now) / then - 1
    if abs(moved) <= DRIFT_WARNING:
        return None
    return (
        f"The unpruned model timed {abs(moved):.0%} {'slower' if moved > 0 else 'faster'} when the front was timed "
        f"again ({statistics.median(now):.2f} ms) than when the study was created ({then:.2f} ms): this machine's "
        "state changed since, and the ratios of small models move with it. Read the budget against a baseline timed "
        "now, or rerun the search in one sitting."
    )


def _budget_ratio(r: Row) -> float:
    """The study's budget as a fraction of the baseline's latency (0 when the row does not know it)."""
    return r.budget_ms * r.ratio / r.latency_ms if r.budget_ms and r.latency_ms else 0.0
