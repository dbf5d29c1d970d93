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
from typing import Any

from rich.console import Console
from rich.text import Text

from search.config import SearchConfig
from search.console import RichReporter, export_summary, front_table, show_trial
from search.data_spec import DataSpec
from search.errors import UsageError
from search.export_settings import ExportSettings
from search.report import pareto_front, plot_front, recommended, rows

__all__ = ["main"]

DEFAULTS = SearchConfig(budget_ms=1.0)
EXPORT_DEFAULTS = ExportSettings()
"""Where the CLI's defaults come from, so the flags and the library cannot disagree."""

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _number(kind: type, ok: Callable[[float], bool], meaning: str) -> Callable[[str], Any]:
    """An argparse type: parse ``text`` as ``kind`` and accept it only when ``ok`` says so."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {text!r}")
        return value

    return parse


_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_positive_int = _number(int, lambda v: v >= 1, "a positive whole number")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_speed_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1], e.g. 0.5 for half the latency")


def _precisions(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    if not values or any(v not in ("fp32", "int8") for v in values):
        raise argparse.ArgumentTypeError(f"must be fp32, int8 or fp32,int8, got {text!r}")
    return tuple(p for p in ("fp32", "int8") if p in values)  # one order, so a resumed study's settings match


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


def _cpus(text: str) -> tuple[int, ...]:
    from search.workers import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    """Several workers on one study: see README, 'Several workers and machines'."""
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="start this many worker processes here, each pinned to its own cores; needs a database "
        "server as --storage (default: 1, this process)",
    )
    parser.add_argument(
        "--cpus", type=_cpus, help="pin this worker to these CPUs, e.g. 0 or 0-3 (with --workers: the CPUs to share)"
    )
    parser.add_argument(
        "--heartbeat",
        type=_positive_int,
        help="a new study's heartbeat in seconds: a trial whose worker is silent for twice this long is "
        "failed and retried once (default: 60; workers joining a study use its value)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py", description="Search structured-pruning policies for a CNN under a measured CPU latency budget."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("search", help="search pruning policies under a latency budget (creates or resumes a study)")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-ms",
        type=_positive_float,
        help="latency budget in ms (batch 1, ONNX Runtime on this CPU, --threads threads)",
    )
    budget.add_argument(
        "--budget-fraction",
        type=_speed_fraction,
        help="latency budget as a fraction of the unpruned model's latency, measured when the study is "
        "created (e.g. 0.5); the study stores the resulting ms",
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
        help="finished trials the study should have, not counting sampled policies measured over the budget "
        f"(seconds each, never fine-tuned); rerunning resumes until then (default: {DEFAULTS.trials})",
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
        "--val-images",
        type=_positive_int,
        help="evaluate trials on a fixed random subset of this many validation images (default: all)",
    )
    s.add_argument(
        "--fit-budget",
        action="store_true",
        help="fit every sampled policy to the budget: keep its per-stage shape, choose its strength by "
        "bisection on measured latency (a few extra measurements per trial; recipes run as they are)",
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
    s.add_argument(
        "--precision",
        type=_precisions,
        default=DEFAULTS.precisions,
        help="deployment precisions to search, comma-separated: fp32, int8 (ONNX Runtime static quantization, "
        "dropped where this CPU does not run it faster) (default: fp32,int8)",
    )
    s.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        default=DEFAULTS.calibration_method,
        help=f"INT8 activation-range calibration (default: {DEFAULTS.calibration_method})",
    )
    s.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=DEFAULTS.calibration_images,
        help=f"training images that calibrate each INT8 model (default: {DEFAULTS.calibration_images})",
    )
    _add_worker_options(s)
    _add_study_options(s)

    p = sub.add_parser("pareto", help="show a study's Pareto front as a table (or JSON) and write its plot")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plot", help="where to write the PNG (default: studies/<study>/pareto.png)")
    _add_study_options(p)
    p.set_defaults(require_study=True)

    show = sub.add_parser("show", help="one trial's policy, channels, measurements and phase times")
    show.add_argument("--trial", type=_non_negative_int, required=True, help="trial number")
    show.add_argument("--format", choices=["table", "json"], default="table")
    _add_study_options(show)

    dash = sub.add_parser("dashboard", help="start optuna-dashboard on the study's storage (localhost)")
    dash.add_argument("--port", type=_positive_int, default=8080)
    dash.add_argument("--host", default="127.0.0.1")
    _add_study_options(dash)

    e = sub.add_parser("export", help="fully fine-tune chosen trials and export them to ONNX with a model card")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=_non_negative_int, action="append", help="trial number (repeatable)")
    which.add_argument("--best", action="store_true", help="the most accurate trial within the budget")
    e.add_argument(
        "--epochs",
        type=_non_negative_float,
        default=EXPORT_DEFAULTS.epochs,
        help=f"full fine-tune epochs; a fraction trains part of one (default: {EXPORT_DEFAULTS.epochs:g})",
    )
    e.add_argument("--seed", type=_non_negative_int, default=EXPORT_DEFAULTS.seed, help="fine-tune seed")
    e.add_argument(
        "--test-images",
        type=_positive_int,
        help="score top-1 on a fixed random subset of this many held-out images (quick checks; default: all)",
    )
    e.add_argument("--lr", type=_positive_float, default=EXPORT_DEFAULTS.lr, help="peak learning rate")
    e.add_argument("--batch", type=_positive_int, default=EXPORT_DEFAULTS.batch_size, help="batch size")
    e.add_argument(
        "--distill",
        type=_fraction,
        default=EXPORT_DEFAULTS.distill,
        help=f"distillation weight from the unpruned model (default: {EXPORT_DEFAULTS.distill})",
    )
    e.add_argument("--train-dtype", choices=["auto", "bf16", "fp32"], default="auto")
    e.add_argument("--out", help="output folder (default: studies/<study>/export)")
    e.add_argument("--force", action="store_true", help="replace an existing export in --out")
    e.add_argument("--weights", help="a copy of the study's baseline file, if it moved (checked by hash)")
    _add_study_options(e)

    b = sub.add_parser("bench", help="measure any ONNX model's latency the way the search does")
    b.add_argument("onnx", help="path to a .onnx file")
    b.add_argument("--threads", type=_positive_int, default=1)
    b.add_argument("--reference", help="another .onnx to time interleaved with it (e.g. the unpruned model)")
    b.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def _search(args: argparse.Namespace, console: Console) -> int:
    from search.study import run_search

    config = SearchConfig(
        budget_ms=args.budget_ms,
        budget_fraction=args.budget_fraction,
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
        val_images=args.val_images,
        fit_budget=args.fit_budget,
        baseline_epochs=args.baseline_epochs,
        train_dtype=args.train_dtype,
        precisions=args.precision,
        calibration_method=args.calibration_method,
        calibration_images=args.calibration_images,
        studies_dir=args.studies_dir,
        heartbeat_seconds=args.heartbeat,
    )
    if args.workers > 1:
        return _search_with_workers(args, config, console)
    if args.cpus:
        from search.workers import pin_to_cpus

        console.print(pin_to_cpus(args.cpus, config.threads), highlight=False)
    with RichReporter(console, verbose=not args.quiet) as reporter:
        result = run_search(config, reporter)
    _print_front(console, result.study, config.study_name, config.storage_url, Path(config.studies_dir))
    if result.interrupted:
        console.print("[yellow]Interrupted.[/] The study is saved; run the same command again to resume it.")
        return EXIT_INTERRUPTED
    return 0


def _search_with_workers(args: argparse.Namespace, config: SearchConfig, console: Console) -> int:
    from search.storage import open_study
    from search.workers import run_local_workers

    with RichReporter(console, verbose=not args.quiet) as reporter:
        launched = run_local_workers(config, args.raw_argv, args.workers, args.cpus, reporter)
    for w in launched.failed:
        if w.returncode == EXIT_USAGE:
            raise UsageError(f"worker {w.index} stopped: {w.last_error().removeprefix('error: ')} (log {w.log})")
        console.print(f"[red]Worker {w.index} exited with status {w.returncode}:[/] {w.last_error()} (log {w.log})")
    if launched.trials_by_worker:
        counts = ", ".join(f"worker {i}: {n}" for i, n in sorted(launched.trials_by_worker.items()))
        console.print(f"Trials finished by each worker: {counts}")
    study = open_study(config.study_name, config.storage_url)
    _print_front(console, study, config.study_name, config.storage_url, Path(config.studies_dir))
    if launched.interrupted:
        console.print("[yellow]Interrupted.[/] The study is saved; run the same command again to resume it.")
        return EXIT_INTERRUPTED
    return 1 if launched.failed else 0


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
    study, url = _study_of(args)
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


def _study_of(args: argparse.Namespace) -> tuple[Any, str]:
    from search.storage import open_study

    if not args.study:
        raise UsageError(f"{args.command} needs --study NAME (the name search printed, e.g. resnet18-digits-30ms)")
    url = args.storage or f"sqlite:///{Path(args.studies_dir) / args.study}.db"
    return open_study(args.study, url), url


def _show(args: argparse.Namespace, console: Console) -> int:
    from search.export import finished_trial

    study, _ = _study_of(args)
    trial = finished_trial(study, args.trial)
    attrs = dict(trial.user_attrs)
    history = attrs.pop("pruning_history", None)
    if args.format == "json":
        console.print_json(
            json.dumps(
                {
                    "trial": trial.number,
                    "values": trial.values,
                    "params": trial.params,
                    **attrs,
                    "pruning_history_entries": len(history or []),
                }
            )
        )
        return 0
    console.print(show_trial(trial, float(study.user_attrs["budget_ms"])))
    return 0


def _dashboard(args: argparse.Namespace, console: Console) -> int:
    import os
    import shutil

    study, url = _study_of(args)
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    if not Path(exe).exists():
        raise UsageError("optuna-dashboard is not installed; pip install optuna-dashboard")
    artifacts = Path(args.studies_dir) / args.study / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [exe, url, "--host", args.host, "--port", str(args.port), "--artifact-dir", str(artifacts)]
    console.print(f"optuna-dashboard for study {study.study_name!r}: http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(exe, command)  # become optuna-dashboard, so a signal to this process reaches the server
    return 0  # not reached


def _export(args: argparse.Namespace, console: Console) -> int:
    import shlex

    from search.export import attach_artifacts, export_trial, load_study_baseline, pick_best

    study, _ = _study_of(args)
    settings = ExportSettings(
        epochs=args.epochs,
        test_images=args.test_images,
        batch_size=args.batch,
        lr=args.lr,
        distill=args.distill,
        train_dtype=args.train_dtype,
        seed=args.seed,
    )
    out = Path(args.out) if args.out else Path(args.studies_dir) / args.study / "export"
    command = "python cli.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with RichReporter(console, verbose=not args.quiet) as reporter:
        numbers = [pick_best(study)] if args.best else list(dict.fromkeys(args.trial))
        base = load_study_baseline(study, weights=args.weights, reporter=reporter)
        cards = []
        for number in numbers:
            card = export_trial(
                base, number, settings, out / f"trial-{number}", command=command, force=args.force, reporter=reporter
            )
            attach_artifacts(study, number, out / f"trial-{number}", Path(args.studies_dir) / args.study / "artifacts")
            cards.append(card)
    for card in cards:
        console.print(export_summary(card, out / f"trial-{card['trial']}"))
    return 0


def _bench(args: argparse.Namespace, console: Console) -> int:
    from search.latency import LatencySettings, measure, open_session

    def shape_of(path: str) -> tuple[int, ...]:
        if not Path(path).is_file():
            raise UsageError(f"ONNX file {path} does not exist")
        try:
            dims = open_session(path, 1).get_inputs()[0].shape
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise UsageError(f"{path} is not a model ONNX Runtime can load: {str(exc).splitlines()[0]}") from None
        return tuple(1 if not isinstance(d, int) else d for d in dims)

    shape = shape_of(args.onnx)
    if args.reference and shape_of(args.reference) != shape:
        raise UsageError(f"--reference takes input {shape_of(args.reference)}, but {args.onnx} takes {shape}")
    result = measure(args.onnx, shape, LatencySettings(threads=args.threads), reference=args.reference)
    record = {
        "onnx": args.onnx,
        "input": list(shape),
        "threads": args.threads,
        "median_ms": result.median_ms,
        "p90_ms": result.p90_ms,
        "runs": result.runs,
        "stable": result.stable,
        "reference_median_ms": result.reference_median_ms,
        "ratio": result.ratio,
    }
    if args.format == "json":
        console.print_json(json.dumps(record))
        return 0
    line = (
        f"{args.onnx}: median {result.median_ms:.3f} ms, p90 {result.p90_ms:.3f} ms over {result.runs} runs "
        f"(batch 1, input {list(shape)}, {args.threads} thread(s){'' if result.stable else ', not yet stable'})"
    )
    if result.ratio is not None:
        line += f"; reference {result.reference_median_ms:.3f} ms, ratio {result.ratio:.3f}"
    console.print(line)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "search": _search,
    "pareto": _pareto,
    "show": _show,
    "dashboard": _dashboard,
    "export": _export,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # what --workers passes on to each worker
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
