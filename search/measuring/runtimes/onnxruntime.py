"""ONNX Runtime's CPU execution provider: the default runtime."""

from __future__ import annotations

from typing import Any

import numpy as np

from search.measuring.runtimes.base import Run, RuntimeInfo, import_problem

__all__ = ["ONNXRUNTIME", "OnnxRuntime", "open_session"]

ONNXRUNTIME = RuntimeInfo(
    name="onnxruntime",
    package="onnxruntime",
    requirement="onnxruntime>=1.20,<2",
    extra=None,
    module="onnxruntime",
    file_format="onnx",
    fp32_file="model.onnx",
    int8_file="model.int8.onnx",
    label="onnxruntime CPUExecutionProvider",
)


def open_session(onnx_model: bytes | str, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    info = ONNXRUNTIME

    def unavailable(self) -> str | None:
        return import_problem(self.info.module)

    def load(self, model: bytes | str, threads: int) -> Run:
        session = open_session(model, threads)
        name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {name: batch})[0]

        return run

    def input_shape(self, model: bytes | str) -> list[int | str]:
        return [d if isinstance(d, int) else str(d) for d in open_session(model, 1).get_inputs()[0].shape]
