"""Command line: ``python cli.py search|pareto ...``. The only code that owns the console.

Each subcommand is a function looked up in :data:`COMMANDS`. A user mistake is a one-line
``error:`` and exit status 2; Ctrl-C leaves the study resumable and exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from search.config import SearchConfig
from search.console import RichReporter, front_table
from search.data import DataSpec
from search.errors import UsageError
from search.report import pareto_front, plot_front, recommended, rows

__all__ = ["main"]

DEFAULTS = SearchConfig(budget_ms=1.0)
"""Where the CLI's defaults come from, so the flags and the library cannot disagree."""

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _triple(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"must be three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="study name (default: <model>-<data>-<budget>ms)")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--studies-dir", default="studies", help="folder for study databases, caches and plots")
    parser.add_argument("-v", "--verbose", action="store_true", help="show more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only errors, warnings and the result")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py", description="Search structured-pruning policies for a CNN under a measured CPU latency budget."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("search", help="search pruning policies under a latency budget (creates or resumes a study)")
    s.add_argument(
        "--budget-ms",
        type=_positive_float,
        required=True,
        help="latency budget in ms (batch 1, ONNX Runtime on this CPU, --threads threads)",
    )
    s.add_argument(
        "--model",
        default="resnet18",
        help="torchvision architecture (resnet18, resnet34, resnet50, mobilenet_v2; resnet*_cifar for "
        "small inputs) or module:function returning an nn.Module (default: resnet18)",
    )
    s.add_argument(
        "--weights",
        help="state_dict file, this tool's checkpoint, or 'imagenet'; omit to train a baseline here (cached)",
    )
    s.add_argument(
        "--data", default="digits", help="digits (built in), imagefolder:PATH, or cifar10:PATH (default: digits)"
    )
    s.add_argument("--input-size", type=_positive_int, help="input resolution (default: per dataset)")
    s.add_argument("--mean", type=_triple, help="normalisation mean, e.g. 0.485,0.456,0.406 (default: per dataset)")
    s.add_argument("--std", type=_triple, help="normalisation std (default: per dataset)")
    s.add_argument("--space", help="search-space file (default: spaces/<model family>.toml)")
    s.add_argument(
        "--trials",
        type=_positive_int,
        default=DEFAULTS.trials,
        help=f"finished trials the study should have; rerunning resumes until then (default: {DEFAULTS.trials})",
    )
    s.add_argument("--timeout", type=_positive_float, help="stop starting new trials after this many seconds")
    s.add_argument("--seed", type=int, default=0, help="sampler and training seed (default: 0)")
    s.add_argument(
        "--threads", type=_positive_int, default=1, help="ONNX Runtime intra-op threads for latency (default: 1)"
    )
    s.add_argument(
        "--finetune-steps",
        type=_non_negative_int,
        default=DEFAULTS.finetune_steps,
        help=f"SGD steps of brief fine-tuning per trial (default: {DEFAULTS.finetune_steps})",
    )
    s.add_argument("--finetune-batch", type=_positive_int, default=32, help="fine-tune batch size (default: 32)")
    s.add_argument("--finetune-lr", type=_positive_float, default=0.01, help="fine-tune peak learning rate")
    s.add_argument(
        "--distill",
        type=_fraction,
        default=0.0,
        help="weight of distillation from the unpruned model in the brief fine-tune, 0..1 (default: 0)",
    )
    s.add_argument(
        "--bn-batches",
        type=_non_negative_int,
        default=DEFAULTS.bn_batches,
        help=f"training batches for BatchNorm recalibration after pruning (default: {DEFAULTS.bn_batches})",
    )
    s.add_argument(
        "--baseline-epochs",
        type=_positive_int,
        default=DEFAULTS.baseline_epochs,
        help=f"epochs to train a baseline when --weights is omitted (default: {DEFAULTS.baseline_epochs})",
    )
    s.add_argument(
        "--train-dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="training arithmetic; auto uses bf16 only where the CPU has it natively",
    )
    _add_study_options(s)

    p = sub.add_parser("pareto", help="show a study's Pareto front as a table (or JSON) and write its plot")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plot", help="where to write the PNG (default: studies/<study>/pareto.png)")
    _add_study_options(p)
    p.set_defaults(require_study=True)
    return parser


def _search(args: argparse.Namespace, console: Console) -> int:
    from search.study import run_search

    config = SearchConfig(
        budget_ms=args.budget_ms,
        model=args.model,
        weights=args.weights,
        data=DataSpec(source=args.data, input_size=args.input_size, mean=args.mean, std=args.std, seed=args.seed),
        space=args.space,
        study=args.study,
        storage=args.storage,
        trials=args.trials,
        timeout=args.timeout,
        seed=args.seed,
        threads=args.threads,
        finetune_steps=args.finetune_steps,
        finetune_batch=args.finetune_batch,
        finetune_lr=args.finetune_lr,
        distill=args.distill,
        bn_batches=args.bn_batches,
        baseline_epochs=args.baseline_epochs,
        train_dtype=args.train_dtype,
        studies_dir=args.studies_dir,
    )
    with RichReporter(console, verbose=not args.quiet) as reporter:
        result = run_search(config, reporter)
    _print_front(console, result.study, config.study_name, config.storage_url, Path(config.studies_dir))
    if result.interrupted:
        console.print("[yellow]Interrupted.[/] The study is saved; run the same command again to resume it.")
        return EXIT_INTERRUPTED
    return 0


def _print_front(
    console: Console, study: object, name: str, url: str, studies_dir: Path, plot_path: Path | None = None
) -> None:
    import optuna

    assert isinstance(study, optuna.Study)
    budget = float(study.user_attrs["budget_ms"])
    all_rows = rows(study)
    front = pareto_front(all_rows)
    best = recommended(all_rows)
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
        )
    )
    if best is None:
        console.print("[red]No policy within the budget yet.[/] Run more trials (--trials) or widen the space.")
    else:
        console.print(
            f"Recommended: trial {best.number}, top-1 {best.accuracy:.2%} at {best.latency_ms:.2f} ms "
            f"({best.ratio:.0%} of the baseline): {best.policy.describe()}"
        )
    plot = plot_front(
        all_rows,
        budget,
        plot_path or studies_dir / name / "pareto.png",
        title=f"{name}: accuracy vs latency (budget {budget:g} ms)",
    )
    console.print(f"Plot: {plot}")
    console.print(f"Inspect the study: [bold]optuna-dashboard {url}[/]")


def _pareto(args: argparse.Namespace, console: Console) -> int:
    import optuna

    from search.storage import load_existing, open_storage

    if not args.study:
        raise UsageError("pareto needs --study NAME (the name search printed, e.g. resnet18-digits-30ms)")
    url = args.storage or f"sqlite:///{Path(args.studies_dir) / args.study}.db"
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        raise UsageError(f"no study database at {url}; check --study and --storage")
    study = load_existing(open_storage(url), args.study)
    if study is None:
        raise UsageError(f"no study named {args.study!r} in {url}")
    assert isinstance(study, optuna.Study)
    if args.format == "json":
        all_rows = rows(study)
        best = recommended(all_rows)
        console.print_json(
            json.dumps(
                {
                    "study": args.study,
                    "budget_ms": study.user_attrs["budget_ms"],
                    "baseline_latency_ms": study.user_attrs["baseline_latency_ms"],
                    "baseline_accuracy": study.user_attrs["baseline_accuracy"],
                    "recommended": best.number if best else None,
                    "front": [r.to_dict() for r in pareto_front(all_rows)],
                    "recipes": [r.to_dict() for r in all_rows if r.recipe],
                }
            )
        )
        return 0
    _print_front(console, study, args.study, url, Path(args.studies_dir), Path(args.plot) if args.plot else None)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {"search": _search, "pareto": _pareto}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the tables, no wrapping of lines
        console = Console(highlight=False, width=200)
    err = Console(stderr=True, highlight=False, width=None if console.is_terminal else 1000)
    try:
        return COMMANDS[args.command](args, console)
    except UsageError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/] Nothing was lost: run the same command again to resume the study.")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
