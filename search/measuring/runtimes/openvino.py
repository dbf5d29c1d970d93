"""OpenVINO's CPU plugin: the same ONNX models (FP32, and the INT8 QDQ model), or the IR export ships.

Compiled with the thread count pinned (``INFERENCE_NUM_THREADS``), one stream and the latency
hint, and FP32 inference precision: on CPUs with bf16 (AVX-512 BF16, AMX) the plugin would
otherwise run FP32 models in bf16, which is another model's numbers, not the shipped one's.

OpenVINO is imported with its usage telemetry off (:func:`import_openvino`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from search.measuring.runtimes.base import Run, RuntimeInfo, import_problem
from search.measuring.runtimes.signal_stack import kept_signal_stack

__all__ = ["OPENVINO", "OpenVino", "compile_model", "import_openvino", "read_model"]

OPENVINO = RuntimeInfo(
    name="openvino",
    package="openvino",
    requirement="openvino>=2026.4,<2027",
    extra="openvino",
    module="openvino",
    file_format="onnx",
    fp32_file="model.xml",
    int8_file="model.int8.xml",
    label="openvino CPU plugin",
)


def import_openvino() -> Any:
    """The ``openvino`` module, imported without its usage telemetry.

    ``import openvino`` loads the model converter, whose telemetry (on unless the user opted out with
    ``opt_in_out --opt_out``) sends a usage event from a thread pool by forking the process. A fork
    taken while the main thread reads a pipe (the timing worker reads its requests from stdin) leaves
    a child that hangs forever in its exit, holding memory: the orphaned timing workers seen after
    test runs. A tool that times models should neither fork nor talk to the network behind the
    user's back, so the telemetry module is hidden before the first import and the converter falls
    back to its own no-op stub. Where OpenVINO was already imported, it is left as it is.
    """
    _hide_telemetry()
    import openvino

    return openvino


def _hide_telemetry() -> None:
    """Make ``import openvino_telemetry`` fail (a None entry), unless OpenVINO was imported before us."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)


def read_model(model: bytes | str | Path) -> Any:
    """An ONNX model's bytes, or an ONNX or IR (``.xml`` beside its ``.bin``) file, as an ``openvino.Model``."""
    ov = import_openvino()
    if not isinstance(model, bytes) and Path(model).suffix.lower() == ".xml":
        _check_ir(Path(model))
    return ov.Core().read_model(model if isinstance(model, bytes) else str(model))


def _check_ir(path: Path) -> None:
    """Refuse an ``.xml`` that is no IR before OpenVINO reads it: it would try each of its frontends in turn, and
    TensorFlow's prints C++ log lines for each (absl noise) before the error."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not re.search(rb"<net[\s>]", head):
        raise ValueError("its XML is not an OpenVINO IR (no <net> element)")


def compile_model(model: Any, threads: int) -> Any:
    """``model`` compiled for the CPU with ``threads`` inference threads, one stream, FP32 precision.

    The calling thread keeps its alternate signal stack (the plugin swaps in one of its own, which
    dangles once models are freed out of order: :mod:`search.measuring.runtimes.signal_stack`).
    """
    ov = import_openvino()

    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    with kept_signal_stack():
        return ov.Core().compile_model(model, "CPU", config)


class OpenVino:
    info = OPENVINO

    def unavailable(self) -> str | None:
        _hide_telemetry()  # the check imports openvino too
        return import_problem(self.info.module)

    def load(self, model: bytes | str, threads: int) -> Run:
        compiled = compile_model(read_model(model), threads)
        request = compiled.create_infer_request()  # leaves the signal stack alone (only compiling swaps it)

        def run(batch: np.ndarray) -> np.ndarray:
            request.infer({0: batch})
            return request.get_output_tensor(0).data

        return run

    def input_shape(self, model: bytes | str) -> list[int | str]:
        shape = read_model(model).inputs[0].get_partial_shape()
        return [d.get_length() if d.is_static else "batch" for d in shape]
