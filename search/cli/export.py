"""``cli.py export``: fully fine-tune chosen trials and export each to ONNX with a model card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from search.cli.console import RichReporter, export_summary
from search.cli.options import (
    add_device_option,
    add_runtime_option,
    add_study_options,
    add_target_options,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    study_of,
    target_timer,
)
from search.errors import UsageError
from search.shipping.settings import QUANTIZATION_MODES, ExportSettings

__all__ = ["EXPORT_DEFAULTS", "HELP", "add_arguments", "run"]

EXPORT_DEFAULTS = ExportSettings()
"""Where the flags' defaults come from, so the flags and the library cannot disagree."""

HELP = "fully fine-tune chosen trials and export them to ONNX with a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=non_negative_int, action="append", help="trial number (repeatable)")
    which.add_argument(
        "--best",
        action="store_true",
        help="the recommended trial: the most accurate within the budget, or the fastest of those tied with it",
    )
    parser.add_argument(
        "--epochs",
        type=non_negative_float,
        default=EXPORT_DEFAULTS.epochs,
        help=f"full fine-tune epochs; a fraction trains part of one (default: {EXPORT_DEFAULTS.epochs:g})",
    )
    parser.add_argument("--seed", type=non_negative_int, default=EXPORT_DEFAULTS.seed, help="fine-tune seed")
    parser.add_argument(
        "--test-images",
        type=positive_int,
        help="score top-1 on a fixed random subset of this many held-out images (quick checks; default: all)",
    )
    parser.add_argument("--lr", type=positive_float, default=EXPORT_DEFAULTS.lr, help="peak learning rate")
    parser.add_argument("--batch", type=positive_int, default=EXPORT_DEFAULTS.batch_size, help="batch size")
    parser.add_argument(
        "--distill",
        type=fraction,
        default=EXPORT_DEFAULTS.distill,
        help=f"distillation weight from the unpruned model (default: {EXPORT_DEFAULTS.distill})",
    )
    parser.add_argument(
        "--prune-steps",
        type=positive_int,
        default=EXPORT_DEFAULTS.prune_steps,
        help="reach the trial's channels in this many pruning steps, fine-tuning after each; the epochs are "
        f"split between them (default: {EXPORT_DEFAULTS.prune_steps}, one shot)",
    )
    parser.add_argument(
        "--feature-distill",
        type=non_negative_float,
        default=None,
        help="weight of matching the space's stage outputs to the unpruned model's through 1x1 adapters "
        f"(default: {EXPORT_DEFAULTS.feature_distill:g}; 0 turns it off)",
    )
    parser.add_argument("--train-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    add_device_option(parser)
    parser.add_argument(
        "--finetune-unpruned",
        action="store_true",
        help="fine-tune a policy that prunes nothing too (by default it keeps the baseline's weights)",
    )
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATION_MODES),
        default=EXPORT_DEFAULTS.quantization,
        help="INT8 policies: quantize after the FP32 fine-tune (ptq) or train its last --qat-epochs with fake "
        f"quantization (qat) (default: {EXPORT_DEFAULTS.quantization})",
    )
    parser.add_argument(
        "--qat-epochs",
        type=positive_float,
        help=f"with --quantization qat: how many of --epochs (the last) train with fake quantization "
        f"(default: {EXPORT_DEFAULTS.qat_epochs:g})",
    )
    parser.add_argument("--out", help="output folder (default: studies/<study>/export)")
    parser.add_argument("--force", action="store_true", help="replace an existing export in --out")
    parser.add_argument("--weights", help="a copy of the study's baseline file, if it moved (checked by hash)")
    add_runtime_option(parser, "the runtime whose files are shipped and timed (default and only choice: the study's)")
    add_target_options(parser)
    add_study_options(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    import shlex

    from search.measuring.runtimes.registry import study_runtime
    from search.shipping.card import attach_artifacts
    from search.shipping.export import check_out_dir, export_trial
    from search.shipping.qat import check_quantization
    from search.shipping.rebuild import load_study_baseline
    from search.study.front import finished_trial, pick_best, recommendation, rows
    from search.study.urls import masked_command

    study, _ = study_of(args)
    runtime = study_runtime(study)
    if args.runtime and args.runtime != runtime:
        raise UsageError(
            f"study {args.study!r} was timed in {runtime}, so its export ships and times {runtime} files; "
            f"omit --runtime, or search a study with --runtime {args.runtime}"
        )
    if args.qat_epochs is not None and args.quantization != "qat":
        raise UsageError("--qat-epochs goes with --quantization qat (PTQ quantizes after the fine-tune)")
    timer = target_timer(args)
    settings = ExportSettings(
        epochs=args.epochs,
        test_images=args.test_images,
        batch_size=args.batch,
        lr=args.lr,
        distill=args.distill,
        train_dtype=args.train_dtype,
        device=args.device,
        seed=args.seed,
        finetune_unpruned=args.finetune_unpruned,
        quantization=args.quantization,
        qat_epochs=EXPORT_DEFAULTS.qat_epochs if args.qat_epochs is None else args.qat_epochs,
        prune_steps=args.prune_steps,
        feature_distill=EXPORT_DEFAULTS.feature_distill if args.feature_distill is None else args.feature_distill,
        feature_distill_asked=args.feature_distill is not None,
    )
    out = Path(args.out) if args.out else Path(args.studies_dir) / args.study / "export"
    command = "python cli.py " + " ".join(shlex.quote(a) for a in masked_command(sys.argv[1:]))  # no password
    with RichReporter(console, verbose=not args.quiet) as reporter:
        found = recommendation(rows(study)) if args.best else None  # read once: a live study may move on
        if args.best and found is None:
            pick_best(study)  # nothing within the budget: its one-line error
        numbers = [found.pick.number] if found else list(dict.fromkeys(args.trial))
        for line in found.lines() if found else []:
            console.print(escape(line), soft_wrap=True)
        for number in numbers:  # a missing trial, a mode it cannot take, a taken folder: refused before any export
            finished_trial(study, number)
            check_quantization(study, number, settings)
            check_out_dir(out / f"trial-{number}", args.force)
        base = load_study_baseline(study, weights=args.weights, reporter=reporter)
        cards = []
        for number in numbers:
            card = export_trial(
                base,
                number,
                settings,
                out / f"trial-{number}",
                command=command,
                force=args.force,
                reporter=reporter,
                timer=timer,
            )
            attach_artifacts(study, number, out / f"trial-{number}", Path(args.studies_dir) / args.study / "artifacts")
            cards.append(card)
    for card in cards:
        console.print(export_summary(card, out / f"trial-{card['trial']}"))
    return 0
