"""``cli.py dashboard``: become optuna-dashboard on the study's storage, serving on localhost."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from search.cli.options import add_study_options, positive_int, study_of
from search.cli.ports import bind, check_port
from search.errors import UsageError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "start optuna-dashboard on the study's storage (localhost)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=positive_int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    add_study_options(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    import os
    import shutil

    from search.study.urls import has_secret, password_in_env

    check_port(args.port, lowest=1)
    study, url = study_of(args, ours=False)
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    if not Path(exe).exists():
        raise UsageError("optuna-dashboard is not installed; pip install optuna-dashboard")
    bind(args.host, args.port).close()  # taken, or not an address here: one line now, not the server's traceback
    artifacts = Path(args.studies_dir) / args.study / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    # The password goes to libpq through the environment: a command line is visible to every user (ps).
    url, env = password_in_env(url)
    if has_secret(url):
        console.print("warning: the storage URL's secret stays on optuna-dashboard's command line, where ps shows it")
    command = [exe, url, "--host", args.host, "--port", str(args.port), "--artifact-dir", str(artifacts)]
    console.print(f"optuna-dashboard for study {study.study_name!r}: http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execve(exe, command, {**os.environ, **env})  # become optuna-dashboard, so a signal here reaches the server
    return 0  # not reached
