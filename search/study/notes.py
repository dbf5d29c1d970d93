"""A trial's optuna-dashboard note: what the reports use for it, written whole from the study's records.

Promotion (the trial's rungs) and confirmation (its latency timed again) each change what the reports say about a
trial while its values stay the search's first reading; the note says both. optuna-dashboard keeps one note per
trial and every save replaces it, so the note is always composed from the records, never written piecemeal.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

__all__ = ["refresh_note"]


_SAVES = 3
"""At most this many saves of one note a call: each is followed by reading the records again."""


def refresh_note(study: optuna.Study, trial: FrozenTrial) -> None:
    """Save trial's note from its rung and confirmation records; never fails (a note is a courtesy).

    Two workers can each add a record and save the note at once, the later save from a read that missed the
    other's record: so after saving, the records are read again and the note saved again until it says all of
    them (records are only ever added, so the last save to read them back ends with every section).
    """
    try:
        from optuna_dashboard import get_note, save_note
    except ImportError:  # the dashboard is optional: the records are in the study's user attributes anyway
        return
    try:
        handle = optuna.Trial(study, trial._trial_id)
        for _ in range(_SAVES):
            attrs = study.user_attrs  # read again each time: another worker may have added a record
            text = "\n\n".join(s for s in (_rungs(attrs, trial), _latency(attrs, trial)) if s)
            if not text or text == get_note(handle):
                return
            save_note(handle, text)
    except Exception:  # the database, for a moment: the records stand, only the note is late
        pass


def _rungs(attrs: dict, trial: FrozenTrial) -> str | None:
    from search.study.rungs import trial_rungs

    rungs = trial_rungs(trial, attrs)
    if len(rungs) < 2:  # rung 0 alone: the trial's own values say it all
        return None
    lines = [f"## Trial {trial.number}: rungs", ""]
    for r in rungs:
        images = f" on {r.images} validation images" if r.images else ""
        lines.append(f"- rung {r.rung}: top-1 {r.accuracy:.4f}{images} after {r.steps} fine-tune steps")
    lines += [
        "",
        "The reports use the highest rung; the trial's values are rung 0's. The sampler learns from the highest rung "
        "less the mean gain of the trials fine-tuned to it (`cli.py show --trial N`).",
    ]
    return "\n".join(lines)


def _latency(attrs: dict, trial: FrozenTrial) -> str | None:
    from search.study.confirm import confirmed_record, how_timed, verdict

    record = confirmed_record(attrs, trial.number)
    if record is None:
        return None
    baseline_ms = float(attrs.get("baseline_latency_ms") or 0.0)
    each = ", ".join(f"{r:.3f}" for r in record["ratios"])
    return (
        f"## Trial {trial.number}: latency timed again\n\n{record['corrected_ms']:.3f} ms, "
        f"{record['ratio']:.3f} of the baseline, the median of {how_timed(record)} ({each}): "
        f"{verdict(record, baseline_ms, float(attrs['budget_ms']))}. "
        "The reports use it; the trial's values stay the search's timing."
    )
