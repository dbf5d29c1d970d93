"""``cli.py show``: one trial's policy, channels, measurements and phase times (or its JSON)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from search.cli.console import show_trial
from search.cli.options import add_study_options, non_negative_int, study_of

__all__ = ["HELP", "add_arguments", "run"]

HELP = "one trial's policy, channels, measurements and phase times"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trial", type=non_negative_int, required=True, help="trial number")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_study_options(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    from search.study.confirm import confirmed_record
    from search.study.fidelity import learned_accuracies
    from search.study.front import finished_trial
    from search.study.retry import retry_of
    from search.study.rungs import trial_rungs

    study, _ = study_of(args)
    trial = finished_trial(study, args.trial)
    attrs = dict(trial.user_attrs)
    history = attrs.pop("pruning_history", None)
    rungs = trial_rungs(trial, study.user_attrs)
    learned = learned_accuracies(study.get_trials(deepcopy=False), study.user_attrs).get(trial.number)
    if args.format == "json":
        console.print_json(
            json.dumps(
                {
                    "trial": trial.number,
                    "values": trial.values,
                    "params": trial.params,
                    **attrs,
                    "retry_of": retry_of(trial),
                    "rungs": [r.to_dict() for r in rungs],
                    "highest_rung": rungs[-1].rung if rungs else None,
                    "sampler_learns": learned if learned is not None else (trial.values or [None])[0],
                    "pruning_history_entries": len(history or []),
                    "timed_again": confirmed_record(study.user_attrs, trial.number),
                }
            )
        )
        return 0
    again = confirmed_record(study.user_attrs, trial.number)
    console.print(show_trial(trial, float(study.user_attrs["budget_ms"]), rungs, learned, again))
    return 0
