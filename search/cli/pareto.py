"""``cli.py pareto``: a study's Pareto front as a table (or JSON), and its plot.

:func:`print_front` is also what ``search`` prints when it finishes.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from search.cli.console import front_table
from search.cli.options import add_study_options, study_of
from search.cli.plot import plot_front
from search.measuring.runtimes.registry import get_runtime, study_runtime
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace, parse_space
from search.study.front import Row, pareto_front, recommendation, rows
from search.study.urls import PASSWORD_ENV, has_secret, without_secrets

__all__ = ["HELP", "add_arguments", "limits_hint", "print_front", "run"]

HELP = "show a study's Pareto front as a table (or JSON) and write its plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--plot", help="where to write the PNG (default: studies/<study>/pareto.png)")
    add_study_options(parser)
    parser.set_defaults(require_study=True)


def run(args: argparse.Namespace, console: Console) -> int:
    study, url = study_of(args)
    if args.format == "json":
        all_rows = rows(study)
        found = recommendation(all_rows)
        best = found.pick if found else None
        console.print_json(
            json.dumps(
                {
                    "study": args.study,
                    "budget_ms": study.user_attrs["budget_ms"],
                    "baseline_latency_ms": study.user_attrs["baseline_latency_ms"],
                    "baseline_accuracy": study.user_attrs["baseline_accuracy"],
                    "recommended": best.number if best else None,
                    "recommended_at_space_limits": _pinned(study, best.policy) if best else [],
                    "recommendation": found.to_dict() if found else None,
                    "front": [r.to_dict() for r in pareto_front(all_rows)],
                    "recipes": [r.to_dict() for r in all_rows if r.recipe],
                }
            )
        )
        return 0
    print_front(console, study, args.study, url, Path(args.studies_dir), Path(args.plot) if args.plot else None)
    return 0


def print_front(
    console: Console, study: object, name: str, url: str, studies_dir: Path, plot_path: Path | None = None
) -> None:
    """The front (with the recipes for comparison), the recommended trial, the plot and the dashboard command."""
    import optuna

    assert isinstance(study, optuna.Study)
    budget = float(study.user_attrs["budget_ms"])
    all_rows = rows(study)
    front = pareto_front(all_rows)
    found = recommendation(all_rows)
    best = found.pick if found else None
    comparison = [r for r in all_rows if r.recipe and r not in front]
    shown = sorted(front + comparison, key=lambda r: r.latency_ms)
    base_ms = float(study.user_attrs["baseline_latency_ms"])
    console.print()
    console.print(
        front_table(
            f"Pareto front of study {name!r} (budget {budget:g} ms, baseline {base_ms:.2f} ms; "
            f"recipes shown for comparison)",
            shown,
            budget_ms=budget,
            recommended=best,
            tied=bool(found and found.tied),
        )
    )
    dropped = sorted((r for r in all_rows if r.over_when_timed_again), key=lambda r: r.number)
    if best is None and dropped:
        listed = ", ".join(f"{r.number} ({r.ratio:.3f} of the baseline)" for r in dropped)
        console.print(
            f"[red]No policy stays within the budget when timed again:[/] trials {listed} measured over it by the "
            "median of fresh timings. Run more trials (--trials) for candidates further below the budget, or loosen it."
        )
    elif best is None:
        console.print("[red]No policy within the budget yet.[/] Run more trials (--trials) or widen the space.")
    else:
        console.print(
            f"Recommended: trial {best.number}, top-1 {best.accuracy:.2%}{_margin(best.margin)} at "
            f"{best.latency_ms:.2f} ms ({best.ratio:.0%} of the baseline{_repeats(best)}; top-1 from {best.source()}): "
            f"{best.policy.describe()}"
        )
        for line in found.lines() if found else []:
            console.print(escape(line), soft_wrap=True)
        hint = limits_hint(study, best.policy)
        if hint:
            console.print(f"[yellow]{escape(hint)}[/]")
    target = plot_path or studies_dir / name / "pareto.png"
    if target.is_dir():  # a folder: the plot goes in it
        target = target / "pareto.png"
    elif not target.suffix:  # matplotlib would add .png itself, and the line below name another file
        target = target.with_suffix(".png")
    try:
        runtime = get_runtime(study_runtime(study)).info.label
        plot = plot_front(
            all_rows, budget, target, title=f"{name}: accuracy vs latency (budget {budget:g} ms)", runtime=runtime
        )
        console.print(f"Plot: {escape(str(plot))}")
    except OSError as exc:  # a read-only studies folder: the table above is the answer, the plot is extra
        console.print(
            f"[yellow]The plot could not be written to {escape(str(target))} ({escape(exc.strerror or str(exc))}); "
            "pass --plot PATH in a writable folder to get it.[/]"
        )
    secret = has_secret(url)
    env = f"{PASSWORD_ENV}=... " if secret else ""  # libpq reads the password from there when the URL has none
    dashboard = f"{env}optuna-dashboard {without_secrets(url)}"
    console.print(f"Inspect the study: [bold]{escape(dashboard)}[/]", soft_wrap=True)  # one line, to paste
    if best is not None:
        where = [] if url == f"sqlite:///{studies_dir / name}.db" else ["--storage", without_secrets(url)]
        where += [] if studies_dir == Path("studies") else ["--studies-dir", str(studies_dir)]
        command = " ".join(["python cli.py export --study", shlex.quote(name), "--best", *map(shlex.quote, where)])
        console.print(f"Export the recommended model: [bold]{escape(env + command)}[/]", soft_wrap=True)
        if secret:
            console.print(
                f"(the URL's password is left out: set {PASSWORD_ENV} to it, or keep it in ~/.pgpass, "
                "and PostgreSQL's client reads it from there)"
            )


def _repeats(r: Row) -> str:
    n = len(r.latency_repeats)
    return f", the median of {n} more timings" if n else ""


def _margin(margin: float | None) -> str:
    return "" if margin is None else f" ±{margin * 100:.1f}"


def _stored_space(study: object) -> SearchSpace | None:
    """The space a study searched, from the text stored on it (None for a study from before that)."""
    stored = getattr(study, "user_attrs", {}).get("space")
    if not isinstance(stored, dict) or not stored.get("text"):
        return None
    return parse_space(stored["text"], str(stored.get("path", "the study's space")))


def _pinned(study: object, policy: Policy) -> list[str]:
    space = _stored_space(study)
    return space.at_upper_limits(policy)[0] if space else []


def limits_hint(study: object, policy: Policy) -> str | None:
    """A line telling the user to widen the space, when ``policy`` is at the top of half its ranges or more."""
    space = _stored_space(study)
    if space is None:
        return None
    pinned, tunable = space.at_upper_limits(policy)
    if not tunable or 2 * len(pinned) < tunable:
        return None
    return (
        f"The recommendation is at the top of {len(pinned)} of its {tunable} ranges ({', '.join(pinned)}): "
        f"this budget needs about as much pruning as the space allows, so the search had little left to "
        f"allocate. To give it room, raise those ranges in a copy of {space.path} and search again with --space COPY "
        f"(or loosen the budget)."
    )
