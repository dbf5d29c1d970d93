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
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

from search.errors import UsageError
from search.progress import Reporter
from search.pruning.policy import Policy

if TYPE_CHECKING:  # the reports read confirmation records without loading the timing stack
    import optuna

    from search.measuring.candidate import CandidateMeter

__all__ = ["CONFIRM_PREFIX", "REPEATS_ENV", "confirm_front", "confirmed_record", "default_repeats", "time_again"]

CONFIRM_PREFIX = "confirmed:"
"""Study attribute ``confirmed:N``: trial N's latency timed again (:func:`time_again`)."""
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


def confirmed_record(study_attrs: dict[str, Any], number: int) -> dict[str, Any] | None:
    """Trial ``number``'s confirmation record, if it was timed again."""
    record = study_attrs.get(f"{CONFIRM_PREFIX}{number}")
    return record if isinstance(record, dict) and record.get("ratios") else None


def time_again(meter: CandidateMeter, trial: optuna.trial.FrozenTrial, repeats: int) -> dict[str, Any]:
    """Trial ``trial``'s model timed ``repeats`` times, each in a fresh timing process, against the unpruned one.

    The model is rebuilt from the trial's pruning history (checked against the architecture it measured)
    and exported as the search timed it (quantized for INT8). On a latency target each repeat is a request.
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
    timings, processes = [], []
    isolated = meter.timer if isinstance(meter.timer, IsolatedTimer) else None
    for _ in range(repeats):
        if isolated is not None:
            isolated.close()  # the next timing starts a fresh process
        timings.append(meter.time_onnx(onnx_model))
        if isolated is not None:
            processes.append(isolated.pid)
    if isolated is not None:
        isolated.close()
    ratios = [float(t.ratio) for t in timings if t.ratio is not None]
    ratio = statistics.median(ratios)
    return {
        "ratios": [round(r, 5) for r in ratios],
        "ratio": round(ratio, 5),
        "corrected_ms": round(ratio * meter.baseline_ms, 4),
        "median_ms": [round(t.median_ms, 4) for t in timings],
        "searched_ratio": float(attrs["latency"]["ratio"]),
        "precision": policy.precision,
        "runs": sum(t.runs for t in timings),
        "processes": processes,
        "measured_on": meter.timer.where,
        "runtime": meter.runtime,
        "seconds": round(time.perf_counter() - started, 2),
    }


def confirm_front(
    study: optuna.Study, meter: CandidateMeter, reporter: Reporter, repeats: int, deadline: float | None = None
) -> int:
    """Time every unconfirmed trial on the front within the budget again, until the front is all confirmed
    (or ``deadline``, a ``time.monotonic()`` value, passes); how many trials were.

    A trial is timed again once: the loop ends because each pass confirms at least one trial or stops.
    """
    from search.study.front import pareto_front, rows

    if repeats < 1:
        return 0
    budget_ms = float(study.user_attrs["budget_ms"])
    done = 0
    failed: set[int] = set()
    while deadline is None or time.monotonic() < deadline:
        todo = [r for r in pareto_front(rows(study)) if not r.latency_repeats and r.number not in failed]
        if not todo:
            break
        row = todo[-1]  # the slowest first: the most accurate, nearest the budget
        reporter.phase(f"time trial {row.number} again ({repeats} fresh processes)")
        trial = study.get_trials(deepcopy=False)[row.number]
        try:
            record = time_again(meter, trial, repeats)
        except (RuntimeError, ValueError, KeyError) as exc:
            failed.add(row.number)
            reporter.warn(f"could not time trial {row.number} again: {str(exc).splitlines()[0]}; it keeps its timing")
            continue
        study.set_user_attr(f"{CONFIRM_PREFIX}{row.number}", record)
        done += 1
        reporter.info(_line(row.number, record, meter.baseline_ms or 0.0, budget_ms))
    return done


def _line(number: int, record: dict[str, Any], baseline_ms: float, budget_ms: float) -> str:
    ratios = record["ratios"]
    budget = budget_ms / baseline_ms if baseline_ms else 0.0
    low, high = min(ratios), max(ratios)
    if record["corrected_ms"] > budget_ms:
        verdict = f"over the budget ({budget:.3f}): no longer a candidate"
    elif high * baseline_ms > budget_ms:
        verdict = f"within the budget ({budget:.3f}) by the median, but not in every repeat"
    else:
        verdict = f"within the budget ({budget:.3f}) in every repeat"
    return (
        f"Trial {number} timed again in {len(ratios)} fresh processes: {record['ratio']:.3f} of the baseline "
        f"(median; {low:.3f}-{high:.3f}; the search's timing {record['searched_ratio']:.3f}), {verdict}"
    )
