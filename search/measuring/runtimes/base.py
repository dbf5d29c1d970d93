"""What a runtime is to the tool: a named package that loads a model file and runs one batch.

Runtimes import their package only when a model is loaded, so naming one costs nothing and a
device with only one runtime installed can time with it (this module needs only numpy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import numpy as np

__all__ = ["Run", "Runtime", "RuntimeInfo", "one_image_at_a_time"]

Run = Callable[[np.ndarray], np.ndarray]
"""One batch (float32 NCHW) in, the first output (the logits) out."""


@dataclass(frozen=True)
class RuntimeInfo:
    """How a runtime is named, installed and shipped."""

    name: str
    """What ``--runtime`` takes and the study records."""
    package: str
    """The PyPI package whose version the fingerprint records."""
    requirement: str
    """The pip requirement with its bounds (what a target device installs)."""
    extra: str | None
    """The extra of this project that installs it (None: a core dependency)."""
    module: str
    """What is imported to use it."""
    file_format: str
    """``onnx`` (timed from the ONNX export) or ``pte`` (an ExecuTorch program lowered from PyTorch)."""
    fp32_file: str
    """The file ``export`` ships for it (FP32); the INT8 one is :attr:`int8_file`."""
    int8_file: str
    label: str
    """How a card names it."""

    def version(self) -> str:
        try:
            return version(self.package)
        except PackageNotFoundError:
            return "missing"

    def install_hint(self) -> str:
        if self.extra is None:
            return f'pip install "{self.requirement}"'
        return f'pip install -e ".[{self.extra}]" (on a latency target: pip install "{self.requirement}")'


class Runtime(Protocol):
    info: RuntimeInfo

    def unavailable(self) -> str | None:
        """Why the runtime cannot be used here (its package cannot be imported), or None."""
        ...

    def load(self, model: bytes | str, threads: int) -> Run:
        """``model`` (bytes, or a file's path) ready to run on the CPU with ``threads`` threads."""
        ...

    def input_shape(self, model: bytes | str) -> list[int | str]:
        """The model's input dimensions (a symbolic one as its name)."""
        ...


def one_image_at_a_time(run: Run) -> Run:
    """``run`` of a batch-1 file (the shipped IR, a ``.pte`` program) on any batch: one image after another,
    each output copied out of the runtime's buffer before the next run overwrites it."""
    return lambda batch: np.concatenate([np.array(run(batch[i : i + 1]), copy=True) for i in range(len(batch))])


def import_problem(module: str) -> str | None:
    """Why ``module`` cannot be imported, in one line, or None when it can.

    Warnings the import logs (ExecuTorch's import makes torch log a deprecation) are not the user's.
    """
    import importlib
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency inside the package
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        logging.disable(previous)
    return None
