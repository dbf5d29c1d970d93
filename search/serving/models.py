"""The models a server answers with: each export folder's card and shipped file in one shared session.

An export folder (``cli.py export``'s ``OUT/trial-N``) is loaded once: its card (which must carry
the ``preprocessing`` record), and the file it ships (``model.int8.onnx`` when the card's precision
is INT8, else ``model.onnx``; for OpenVINO ``model(.int8).xml``, for ExecuTorch ``model(.int8).pte``)
in one ONNX Runtime session (or OpenVINO compiled model, or ExecuTorch program) that every request
shares (:mod:`search.serving.runtime_models`). The study's unpruned model can be added, exported to ONNX the same way
(:func:`baseline_model`), so every answer can be compared with the model the export replaces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import UsageError
from search.measuring.runtimes.onnxruntime import open_session
from search.measuring.runtimes.registry import require_runtime
from search.pruning.policy import Policy
from search.serving.preprocess import MissingPreprocessing, Preprocessing
from search.serving.runtime_models import runtime_runner

__all__ = ["ServedModel", "load_export"]


@dataclass
class ServedModel:
    """One model being served: its name, what its card says, and its session."""

    name: str
    role: str
    """``pruned`` or ``unpruned`` (an export, as its card's policy says) or ``baseline`` (the study's unpruned
    model, exported at start)."""
    precision: str
    file: str
    preprocessing: Preprocessing
    summary: dict[str, Any]
    """The card at a glance: latency at search, accuracy, MACs, params, size (what the page shows)."""
    card: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    """Input batch -> logits in the model's runtime (safe to call from several threads)."""
    study: str | None = None
    folder: str | None = None
    """The export folder it was loaded from (None for the baseline, exported at start)."""
    runtime: str = "onnxruntime"

    def logits(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """The model's logits for input batch ``x`` and the milliseconds ``run`` took."""
        started = time.perf_counter()
        out = self.run(x)
        return out, (time.perf_counter() - started) * 1000.0


def load_export(folder: Path, threads: int, runtime: str | None = None) -> ServedModel:
    """Load export folder ``folder``; a one-line :class:`UsageError` for anything that is not a usable export.

    ``runtime`` serves that runtime's file (default: the runtime the export was timed in, as its card says).
    """
    card_path = folder / "card.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass an export folder (`cli.py export` writes OUT/trial-N)")
    if not card_path.is_file():
        raise UsageError(f"{folder} has no card.json; pass an export folder (`cli.py export` writes OUT/trial-N)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {card_path}: {exc}; export the trial again") from None
    try:
        pre = Preprocessing.from_card(card)
    except MissingPreprocessing as exc:
        raise UsageError(f"{folder} cannot be served: {exc}; re-export it: {_reexport(card)}") from None
    precision = card.get("precision", "fp32")
    shipped_in = card.get("latency", {}).get("runtime_name", "onnxruntime")
    runtime = runtime or shipped_in
    info = require_runtime(runtime).info
    name = info.int8_file if precision == "int8" else info.fp32_file
    path = folder / name
    if not path.is_file() and runtime != shipped_in:
        raise UsageError(
            f"{folder} has no {name}: it was exported for {shipped_in}; serve it with --runtime {shipped_in}, "
            f"or export a study searched with --runtime {runtime}"
        )
    if not path.is_file():
        raise UsageError(f"{folder} has no {name}, which its card says it ships; export the trial again")
    if runtime == "onnxruntime":
        try:
            session = open_session(str(path), threads)
        except Exception as exc:  # ONNX Runtime's own errors are not one class
            raise UsageError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
        _check_shapes(session, pre, str(path))
        run = _session_runner(session, pre.input_name)
    else:
        run = runtime_runner(runtime, path, threads, str(path))
        _check_output(run, pre, str(path))
    return ServedModel(
        name=f"trial-{card.get('trial', folder.name)}",
        role=_role(card),
        precision=precision,
        file=name,
        preprocessing=pre,
        summary=_summary(card, path.stat().st_size),
        card=card,
        run=run,
        study=card.get("study"),
        folder=str(folder),
        runtime=runtime,
    )


def _session_runner(session: Any, input_name: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: session.run(None, {input_name: x})[0]


def _check_output(run: Callable[[np.ndarray], np.ndarray], pre: Preprocessing, where: str) -> None:
    """The model runs on one ``1×3×S×S`` image at the card's input size and gives one logit per class."""
    try:
        out = run(np.zeros((1, 3, pre.input_size, pre.input_size), np.float32))
    except Exception as exc:  # the runtime's own error types
        raise UsageError(
            f"{where} does not run on a 1x3x{pre.input_size}x{pre.input_size} image as its card says "
            f"({str(exc).splitlines()[0][:200]}); export the trial again"
        ) from None
    if out.shape[-1] != len(pre.classes):
        raise UsageError(f"{where} gives {out.shape[-1]} outputs, but its card names {len(pre.classes)} classes")


def _role(card: dict[str, Any]) -> str:
    """``unpruned`` for an export whose policy removes nothing (such as an unpruned INT8 trial), else ``pruned``."""
    try:
        return "unpruned" if Policy.from_dict(card["policy"]).is_unpruned else "pruned"
    except (KeyError, TypeError, ValueError, AttributeError):  # a card without a readable policy
        return "pruned"


def _reexport(card: dict[str, Any]) -> str:
    if card.get("study") is not None and card.get("trial") is not None:
        return f"python cli.py export --study {card['study']} --trial {card['trial']} --force"
    return "python cli.py export ... --force"


def _check_shapes(session: Any, pre: Preprocessing, where: str) -> None:
    """The model takes ``N×3×S×S`` at the card's input size and gives one logit per class."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape)
    if inputs[0].name != pre.input_name or shape[1:] != [3, pre.input_size, pre.input_size]:
        raise UsageError(
            f"{where} takes {inputs[0].name} {shape}, but its card says {pre.input_name} [N, 3, {pre.input_size}, "
            f"{pre.input_size}]; export the trial again"
        )
    width = outputs[0].shape[-1]
    if isinstance(width, int) and width != len(pre.classes):
        raise UsageError(f"{where} gives {width} outputs, but its card names {len(pre.classes)} classes")


def _summary(card: dict[str, Any], size: int) -> dict[str, Any]:
    accuracy, latency = card.get("accuracy", {}), card.get("latency", {})
    return {
        "study": card.get("study"),
        "trial": card.get("trial"),
        "recipe": card.get("recipe"),
        "precision": card.get("precision", "fp32"),
        "latency_ms": latency.get("search_ms") or latency.get("corrected_ms"),
        "export_latency_ms": latency.get("corrected_ms"),
        "latency_threads": latency.get("threads"),
        "top1": accuracy.get("after_finetune"),
        "top1_split": accuracy.get("split"),
        "baseline_top1": accuracy.get("baseline"),
        "macs": card.get("macs"),
        "params": card.get("params"),
        "size_bytes": size,
    }
