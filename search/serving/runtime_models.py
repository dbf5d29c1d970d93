"""Serving a shipped model in OpenVINO or ExecuTorch: the file, loaded once, safe to share.

ONNX Runtime sessions may run from many threads at once; an OpenVINO infer request or an ExecuTorch
method may not. Each thread gets its own OpenVINO infer request on the one compiled model (the IR
export ships takes batch 1: a batch runs one image at a time), and an ExecuTorch program (batch 1)
runs one image at a time under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from search.errors import UsageError
from search.measuring.runtimes.base import one_image_at_a_time
from search.measuring.runtimes.registry import require_runtime

__all__ = ["runtime_runner"]


def runtime_runner(runtime: str, model: bytes | Path, threads: int, where: str) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` (a file of ``runtime``, or ONNX bytes for OpenVINO) as a thread-safe batch -> logits function."""
    engine = require_runtime(runtime)
    try:
        if runtime == "openvino":
            run = _openvino(model, threads)
        else:
            run = _executorch(engine.load(model if isinstance(model, bytes) else str(model), threads))
    except UsageError:
        raise
    except Exception as exc:  # each runtime raises its own types
        raise UsageError(f"{runtime} cannot load {where}: {str(exc).splitlines()[0][:200]}") from None
    return run


def _openvino(model: bytes | Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from search.measuring.runtimes.openvino import compile_model, read_model

    compiled = compile_model(read_model(model if isinstance(model, bytes) else str(model)), threads)
    batch_dim = compiled.inputs[0].get_partial_shape()[0]
    one_at_a_time = batch_dim.is_static and batch_dim.get_length() == 1  # the IR export ships (batch 1)
    local = threading.local()

    def infer(batch: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return one_image_at_a_time(infer) if one_at_a_time else infer


def _executorch(method: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    lock = threading.Lock()
    each = one_image_at_a_time(method)

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            return each(batch)

    return run
