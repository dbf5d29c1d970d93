"""``cli.py search``: create or resume a study and run its trials under a latency budget.

With ``--workers K`` this process starts K workers (each an ordinary ``search`` process, pinned to
its own cores) and waits for them; with ``--cpus`` it pins itself. Either way it ends by printing
the study's Pareto front (:func:`search.cli.pareto.print_front`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from search.cli.console import RichReporter
from search.cli.options import (
    EXIT_INTERRUPTED,
    EXIT_TARGET_LOST,
    EXIT_USAGE,
    add_device_option,
    add_runtime_option,
    add_study_options,
    add_target_options,
    add_worker_options,
    count_or_all,
    fraction,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    positive_triple,
    precisions,
    repeats_count,
    speed_fraction,
    step_counts,
    target_timer,
    triple,
)
from search.cli.pareto import print_front
from search.data.spec import DataSpec
from search.errors import UsageError
from search.study.config import PROMOTION_FACTOR, SAMPLERS, SearchConfig

__all__ = ["DEFAULTS", "HELP", "add_arguments", "run"]

DEFAULTS = SearchConfig(budget_ms=1.0)
"""Where the flags' defaults come from, so the flags and the library cannot disagree."""

HELP = "search pruning policies under a latency budget (creates or resumes a study)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_budget_model_and_data(parser)
    _add_trial_options(parser)
    _add_precision_options(parser)
    add_target_options(parser)
    add_worker_options(parser)
    add_study_options(parser)


def _add_budget_model_and_data(parser: argparse.ArgumentParser) -> None:
    """What is searched: the budget, the model and its weights, the data and the space."""
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-ms",
        type=positive_float,
        help="latency budget in ms (batch 1, --runtime on this CPU or --target, --threads threads)",
    )
    budget.add_argument(
        "--budget-fraction",
        type=speed_fraction,
        help="latency budget as a fraction of the unpruned model's latency, measured when the study is "
        "created (e.g. 0.5); the study stores the resulting ms",
    )
    parser.add_argument(
        "--model",
        default="resnet18",
        help="torchvision architecture (resnet18, resnet34, resnet50, mobilenet_v2; resnet*_cifar for "
        "small inputs) or module:function returning an nn.Module (default: resnet18)",
    )
    parser.add_argument(
        "--weights",
        help="state_dict file, this tool's checkpoint, or 'imagenet'; omit to train a baseline here (cached)",
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="digits (built in), imagefolder:PATH, cifar10 (downloaded once into a cache folder), or cifar10:PATH "
        "(default: digits)",
    )
    parser.add_argument("--input-size", type=positive_int, help="input resolution (default: per dataset)")
    parser.add_argument("--mean", type=triple, help="normalisation mean, e.g. 0.485,0.456,0.406 (default: per dataset)")
    parser.add_argument("--std", type=positive_triple, help="normalisation std (default: per dataset)")
    parser.add_argument(
        "--space", help="search-space file (default: spaces/<model>.toml where one ships, else derived from the model)"
    )


def _add_trial_options(parser: argparse.ArgumentParser) -> None:
    """How long the search runs and what each trial does: timing threads, the brief fine-tune, the baseline."""
    parser.add_argument(
        "--trials",
        type=positive_int,
        default=DEFAULTS.trials,
        help="finished trials the study should have, not counting sampled policies measured over the budget "
        f"(seconds each, never fine-tuned); rerunning resumes until then (default: {DEFAULTS.trials})",
    )
    parser.add_argument("--timeout", type=positive_float, help="stop starting new trials after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed (default: 0)")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="the runtime's threads for latency (default: 1)"
    )
    add_runtime_option(parser, "the runtime every latency is measured in, recorded on the study (default: onnxruntime)")
    parser.add_argument(
        "--confirm-repeats",
        type=repeats_count,
        metavar="N",
        help="once the trials are done, time each trial on the front within the budget N more times, each in a "
        "fresh process, and judge it by their median; one that lands over the budget is not recommended "
        "(default: 3; 0: the search's one timing)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=non_negative_int,
        default=DEFAULTS.finetune_steps,
        help=f"SGD steps of brief fine-tuning per trial (default: {DEFAULTS.finetune_steps})",
    )
    parser.add_argument(
        "--finetune-batch",
        type=positive_int,
        default=DEFAULTS.finetune_batch,
        help=f"fine-tune batch size (default: {DEFAULTS.finetune_batch})",
    )
    parser.add_argument("--finetune-lr", type=positive_float, default=0.01, help="fine-tune peak learning rate")
    parser.add_argument(
        "--distill",
        type=fraction,
        default=0.0,
        help="weight of distillation from the unpruned model in the brief fine-tune, 0..1 (default: 0)",
    )
    parser.add_argument(
        "--bn-batches",
        type=non_negative_int,
        default=DEFAULTS.bn_batches,
        help=f"training batches for BatchNorm recalibration after pruning (default: {DEFAULTS.bn_batches})",
    )
    parser.add_argument(
        "--val-images",
        type=positive_int,
        help="evaluate trials on a fixed random subset of this many validation images (default: all)",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=DEFAULTS.sampler,
        help="how the policies after the recipes are proposed: multi-objective TPE, Optuna's Gaussian-process "
        "sampler (gp: log expected hypervolume improvement under the latency constraint) or random sampling "
        f"(default: {DEFAULTS.sampler})",
    )
    parser.add_argument(
        "--fit-budget",
        action="store_true",
        help="fit every sampled policy to the budget: keep its per-stage shape, choose its strength by "
        "bisection on measured latency (a few extra measurements per trial; recipes run as they are)",
    )
    parser.add_argument(
        "--baseline-epochs",
        type=positive_int,
        default=DEFAULTS.baseline_epochs,
        help=f"epochs to train a baseline when --weights is omitted (default: {DEFAULTS.baseline_epochs})",
    )
    parser.add_argument(
        "--train-dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="training arithmetic; auto uses bf16 where the device has it natively (fp16 with loss scaling on "
        "older GPUs, FP32 on other CPUs)",
    )
    _add_promotion_options(parser)
    add_device_option(parser)
    parser.add_argument(
        "--allow-mixed-devices",
        action="store_true",
        help="let this run add trials fine-tuned on another kind of device (cpu, cuda) than the study's first",
    )


def _add_promotion_options(parser: argparse.ArgumentParser) -> None:
    """Promotion of the best trials to longer fine-tunes: see README, 'Promotion'."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--rungs",
        type=step_counts,
        help="total fine-tune steps of the rungs above the brief fine-tune (rung 0, --finetune-steps), "
        "comma-separated and increasing, e.g. 100,300; the best trials of each rung are fine-tuned on to the "
        "next and read on more validation images (--rung-val-images) (default: one rung of "
        f"{PROMOTION_FACTOR}x --finetune-steps, at most one epoch of the training split; none where that is no more "
        "than --finetune-steps)",
    )
    which.add_argument(
        "--no-promotion",
        action="store_true",
        help="only the brief fine-tune for every trial, no promotion (the behaviour before promotion existed)",
    )
    parser.add_argument(
        "--rung-val-images",
        type=count_or_all,
        default=DEFAULTS.rung_val_images,
        metavar="N|all",
        help="validation images each promotion reads: a fixed subset of N, the same for every trial, or the whole "
        f"split when it has no more; all: always the whole split (default: {DEFAULTS.rung_val_images:,}, never "
        "fewer than --val-images)",
    )
    parser.add_argument(
        "--promote-fraction",
        type=open_fraction,
        help="the best this fraction of the trials at a rung go on to the next, and at least 2 once every trial "
        "has finished (default: 0.25, the top quarter; a resumed study keeps its own)",
    )
    parser.add_argument(
        "--trial-weights",
        metavar="DIR",
        help="folder for each trial's fine-tuned weights, which promotions continue from; workers on several "
        "hosts need a path all of them see (default: studies/<study>/trial-weights)",
    )


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    """Which precisions are searched and how INT8 models are calibrated."""
    parser.add_argument(
        "--precision",
        type=precisions,
        default=DEFAULTS.precisions,
        help="deployment precisions to search, comma-separated: fp32, int8 (static quantization, "
        "dropped where the runtime does not run it faster on this CPU) (default: fp32,int8)",
    )
    parser.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        default=DEFAULTS.calibration_method,
        help=f"INT8 activation-range calibration (default: {DEFAULTS.calibration_method})",
    )
    parser.add_argument(
        "--calibration-images",
        type=positive_int,
        default=DEFAULTS.calibration_images,
        help=f"training images that calibrate each INT8 model (default: {DEFAULTS.calibration_images})",
    )


def _config(args: argparse.Namespace) -> SearchConfig:
    """The search's settings from the parsed flags."""
    if args.rungs and args.rungs[0] <= args.finetune_steps:
        raise UsageError(
            f"--rungs {','.join(map(str, args.rungs))}: each rung's total steps must be above --finetune-steps "
            f"{args.finetune_steps} (rung 0); pass e.g. --rungs {PROMOTION_FACTOR * max(args.finetune_steps, 1)}"
        )
    return SearchConfig(
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
        runtime=args.runtime or "onnxruntime",
        finetune_steps=args.finetune_steps,
        finetune_batch=args.finetune_batch,
        finetune_lr=args.finetune_lr,
        distill=args.distill,
        bn_batches=args.bn_batches,
        val_images=args.val_images,
        fit_budget=args.fit_budget,
        baseline_epochs=args.baseline_epochs,
        train_dtype=args.train_dtype,
        device=args.device,
        allow_mixed_devices=args.allow_mixed_devices,
        precisions=args.precision,
        calibration_method=args.calibration_method,
        calibration_images=args.calibration_images,
        studies_dir=args.studies_dir,
        heartbeat_seconds=args.heartbeat,
        promotion=not args.no_promotion,
        rungs=args.rungs,
        promote_fraction=args.promote_fraction,
        rung_val_images=args.rung_val_images,
        sampler=args.sampler,
        trial_weights=args.trial_weights,
        confirm_repeats=args.confirm_repeats,
    )


def run(args: argparse.Namespace, console: Console) -> int:
    from search.study.run import run_search

    config = _config(args)
    if args.workers > 1:
        return _run_with_workers(args, config, console)
    timer = target_timer(args)
    if args.cpus:
        from search.study.workers import pin_to_cpus

        console.print(pin_to_cpus(args.cpus, config.threads), highlight=False)
    with RichReporter(console, verbose=not args.quiet) as reporter:
        if timer is not None:
            timer.reporter = reporter  # its waits and retries show in the progress line
        result = run_search(config, reporter, timer=timer)
    print_front(console, result.study, config.study_name, config.storage_url, Path(config.studies_dir))
    _print_creation(console, result.study)
    if result.stopped:
        console.print(f"[yellow]Stopped:[/] {result.stopped}")
        return EXIT_TARGET_LOST
    if result.interrupted:
        console.print("[yellow]Interrupted.[/] The study is saved; run the same command again to resume it.")
        return EXIT_INTERRUPTED
    return 0


def _print_creation(console: Console, study: object) -> None:
    """What setting the study up cost before its first trial, and after it, phase by phase (where recorded)."""
    from search.study.creation_clock import creation_line
    from search.study.later_setup import LATER_SECONDS, WHEN

    for line in (creation_line(study), creation_line(study, attr=LATER_SECONDS, when=WHEN)):  # type: ignore[arg-type]
        if line:
            console.print(line, highlight=False, markup=False, soft_wrap=True)


def _run_with_workers(args: argparse.Namespace, config: SearchConfig, console: Console) -> int:
    """``--workers K``: start K worker processes on this machine, wait for them, then print the front."""
    from search.study.storage import open_study
    from search.study.workers import run_local_workers

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
    print_front(console, study, config.study_name, config.storage_url, Path(config.studies_dir))
    _print_creation(console, study)
    if launched.interrupted:
        console.print("[yellow]Interrupted.[/] The study is saved; run the same command again to resume it.")
        return EXIT_INTERRUPTED
    return 1 if launched.failed else 0
