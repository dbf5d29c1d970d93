"""OpenVINO's CPU plugin: the same ONNX models (FP32, and the INT8 QDQ model), or the IR export ships.

Compiled with the thread count pinned (``INFERENCE_NUM_THREADS``), one stream and the latency
hint, and FP32 inference precision: on CPUs with bf16 (AVX-512 BF16, AMX) the plugin would
otherwise run FP32 models in bf16, which is another model's numbers, not the shipped one's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from search.measuring.runtimes.base import Run, RuntimeInfo, import_problem
from search.measuring.runtimes.signal_stack import kept_signal_stack

__all__ = ["OPENVINO", "OpenVino", "compile_model", "read_model"]

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


def read_model(model: bytes | str | Path) -> Any:
    """An ONNX model's bytes, or an ONNX or IR (``.xml`` beside its ``.bin``) file, as an ``openvino.Model``."""
    import openvino as ov

    return ov.Core().read_model(model if isinstance(model, bytes) else str(model))


def compile_model(model: Any, threads: int) -> Any:
    """``model`` compiled for the CPU with ``threads`` inference threads, one stream, FP32 precision.

    The calling thread keeps its alternate signal stack (the plugin swaps in one of its own, which
    dangles once models are freed out of order: :mod:`search.measuring.runtimes.signal_stack`).
    """
    import openvino as ov

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
