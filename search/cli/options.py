"""What several commands share: the argparse value types, the study and worker options, the exit
statuses and opening the study that ``--study`` names.

The value types raise :class:`argparse.ArgumentTypeError`, so a bad value is argparse's own
one-line ``error:`` with exit status 2, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import UsageError

if TYPE_CHECKING:
    from search.latency_service.client import RemoteTimer

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TARGET_LOST",
    "EXIT_USAGE",
    "TOKEN_ENV",
    "add_device_option",
    "add_runtime_option",
    "add_study_options",
    "add_target_options",
    "add_worker_options",
    "count_or_all",
    "cpus",
    "device",
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "open_fraction",
    "positive_float",
    "positive_int",
    "precisions",
    "repeats_count",
    "speed_fraction",
    "step_counts",
    "study_of",
    "target_timer",
    "triple",
]

EXIT_USAGE = 2
EXIT_TARGET_LOST = 3
EXIT_INTERRUPTED = 130
TOKEN_ENV = "PRUNE_SEARCH_TARGET_TOKEN"
"""Environment variable with a latency target's token (read here, by the CLI, and nowhere else)."""


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


positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
positive_int = _number(int, lambda v: v >= 1, "a positive whole number")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
repeats_count = _number(int, lambda v: 0 <= v <= 20, "a whole number from 0 to 20")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
open_fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number between 0 and 1, e.g. 0.333 for the top third")
speed_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1], e.g. 0.5 for half the latency")


def count_or_all(text: str) -> int | None:
    """``"10000"`` as 10000, ``"all"`` as None: a number of images, or all of them."""
    if text.strip().lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or all, got {text!r}") from None


def precisions(text: str) -> tuple[str, ...]:
    """``"int8, fp32"`` as ``("fp32", "int8")``: deployment precisions, each once, in one order."""
    values = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    if not values or any(v not in ("fp32", "int8") for v in values):
        raise argparse.ArgumentTypeError(f"must be fp32, int8 or fp32,int8, got {text!r}")
    return tuple(p for p in ("fp32", "int8") if p in values)  # one order, so a resumed study's settings match


def step_counts(text: str) -> tuple[int, ...]:
    """``"100,300"`` as ``(100, 300)``: positive step counts, strictly increasing."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be increasing step counts like 100,300, got {text!r}") from None
    if not values or values[0] < 1 or any(b <= a for a, b in itertools.pairwise(values)):
        raise argparse.ArgumentTypeError(f"must be increasing step counts like 100,300, got {text!r}")
    return values


def triple(text: str) -> tuple[float, float, float]:
    """``"0.485,0.456,0.406"`` as three floats (a normalisation mean or std)."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be three comma-separated finite numbers, got {text!r}")
    return values  # type: ignore[return-value]


def positive_triple(text: str) -> tuple[float, float, float]:
    """:func:`triple` of numbers above 0 (a normalisation std divides by them)."""
    values = triple(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"must be three numbers above 0, got {text!r}")
    return values


def cpus(text: str) -> tuple[int, ...]:
    """``"0-3"`` or ``"0,2"`` as a sorted tuple of CPU numbers."""
    from search.study.workers import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (lower case); whether this machine has it is checked when used."""
    from search.training.device_names import DEVICE_FORMS, normalise_device

    value = normalise_device(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"must be {DEVICE_FORMS}, got {text!r}")
    return value


def add_runtime_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--runtime``: which runtime latency is measured (and models are shipped or served) in."""
    from search.measuring.runtimes.registry import RUNTIME_NAMES

    parser.add_argument(
        "--runtime",
        choices=RUNTIME_NAMES,
        default=None,
        help=f'{what}; openvino and executorch are extras: pip install -e ".[openvino]" or ".[executorch]"',
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: where training and evaluation run (latency is --runtime on the CPU or the target)."""
    parser.add_argument(
        "--device",
        type=device,
        default="auto",
        help="where fine-tuning and evaluation run: auto (a CUDA GPU when there is one, else the CPU), cpu, "
        "cuda or cuda:N; latency is always measured in --runtime on the CPU (or --target) (default: auto)",
    )


def study_name(text: str) -> str:
    """A study name, which also names its SQLite file and folders: no path separators or URL characters."""
    bad = sorted({c for c in text if c in '/\\?#%:*"<>|' or not c.isprintable()})
    if not text.strip() or text.startswith(".") or bad:
        shown = f" ({' '.join(repr(c) for c in bad)})" if bad else ""
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot name a study{shown}: it names a file and folders too; use letters, digits, '-', '_' "
            "and '.' (not first)"
        )
    return text


def add_study_options(parser: argparse.ArgumentParser) -> None:
    """Which study, where it is stored, and how much to print: every command but ``bench``."""
    parser.add_argument("--study", type=study_name, help="study name (default: <model>-<data>-<budget>ms)")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--studies-dir", default="studies", help="folder for study databases, caches and plots")
    parser.add_argument("-v", "--verbose", action="store_true", help="show more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only errors, warnings and the result")


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """Several workers on one study: see README, 'Several workers and machines'."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="start this many worker processes here, each pinned to its own cores; needs a database "
        "server as --storage (default: 1, this process)",
    )
    parser.add_argument(
        "--cpus", type=cpus, help="pin this worker to these CPUs, e.g. 0 or 0-3 (with --workers: the CPUs to share)"
    )
    parser.add_argument(
        "--heartbeat",
        type=positive_int,
        help="a new study's heartbeat in seconds: a trial whose worker is silent for twice this long is "
        "failed and retried once (default: 60; workers joining a study use its value)",
    )


def study_of(args: argparse.Namespace, ours: bool = True) -> tuple[Any, str]:
    """The study that ``--study`` names (in ``--storage``, or its SQLite file in ``--studies-dir``) and its URL.

    With ``ours``, one this tool's search made and has finished setting up (``pareto``, ``show`` and ``export``
    read what it records); the dashboard shows any study."""
    from search.study.creator import CREATOR_ATTR
    from search.study.storage import open_study
    from search.study.urls import masked

    if not args.study:
        raise UsageError(f"{args.command} needs --study NAME (the name search printed, e.g. resnet18-digits-30ms)")
    url = args.storage or f"sqlite:///{Path(args.studies_dir) / args.study}.db"
    study = open_study(args.study, url)
    if ours and not {"settings", "budget_ms"} & set(study.user_attrs):
        if CREATOR_ATTR in study.user_attrs:
            raise UsageError(f"study {args.study!r} is still being set up by its search; try again once it runs trials")
        raise UsageError(
            f"study {args.study!r} in {masked(url)} was not made by this tool's search; `{args.command}` reads what "
            "`cli.py search` records (`cli.py dashboard` shows any study)"
        )
    return study, url


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """Timing on the device that will run the model: see README, 'Time on the target device'."""
    parser.add_argument(
        "--target",
        metavar="URL",
        help="measure every latency on a latency target (`cli.py target` on the device), e.g. http://board:8765 "
        "(default: this machine)",
    )
    parser.add_argument(
        "--target-token-file",
        metavar="FILE",
        help=f"file holding the target's token (the file `cli.py target` printed); or set {TOKEN_ENV}",
    )
    parser.add_argument(
        "--target-patience",
        type=positive_float,
        default=300.0,
        help="seconds to keep retrying a target that stopped answering before the run stops cleanly (default: 300)",
    )


def target_timer(args: argparse.Namespace) -> RemoteTimer | None:
    """The latency target ``--target`` names, connected (its fingerprint read), or None without ``--target``."""
    import os

    from search.latency_service.client import RemoteTimer

    if not args.target:
        if args.target_token_file:
            raise UsageError("--target-token-file goes with --target URL")
        return None
    if args.target_token_file:
        path = Path(args.target_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --target-token-file {path}: {exc.strerror or exc}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(
            f"--target needs its token: --target-token-file FILE (the file `cli.py target` printed) or {TOKEN_ENV}"
        )
    timer = RemoteTimer(args.target, token, patience_s=args.target_patience)
    timer.connect()
    return timer
