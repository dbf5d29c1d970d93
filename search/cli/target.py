"""``cli.py target``: time ONNX models for searches on other machines (see :mod:`search.latency_service.service`).

On a device without this tool's other dependencies (no PyTorch, no optuna, no rich), run the
same service as ``python -m search.latency_service``.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from search.latency_service.service import add_arguments

__all__ = ["HELP", "add_arguments", "run"]

HELP = "serve latency measurements on this device to searches on other machines (needs only onnxruntime)"


def run(args: argparse.Namespace, console: Console) -> int:
    from search.latency_service.service import serve

    return serve(args)
