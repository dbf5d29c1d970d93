"""The file a runtime times and ships, made from a PyTorch model.

ONNX Runtime and OpenVINO take the tool's ONNX export (FP32, or the INT8 QDQ model of
:mod:`search.measuring.quantize`). ExecuTorch takes a ``.pte`` program lowered here through
``torch.export`` to the XNNPACK backend; its INT8 program is quantized by ExecuTorch's PT2E
``XNNPACKQuantizer`` (per-channel symmetric INT8 weights, INT8 activations), calibrated on the
same training images as the ONNX path (:func:`search.measuring.quantize.calibration_batches`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from copy import deepcopy as copy_module

import numpy as np
import torch
from torch import nn

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.onnx_export import export_onnx
from search.measuring.quantize import (
    LATENCY_CALIBRATION_IMAGES,
    QuantizeSettings,
    calibration_batches,
    int8_latency_model,
)
from search.measuring.runtimes.registry import get_runtime

__all__ = ["lower_pte", "quantize_pte", "timed_file"]


def timed_file(runtime: str, model: nn.Module, data: Dataset, precision: str, quantize: QuantizeSettings) -> bytes:
    """``model`` as ``runtime`` times it at batch 1: ONNX, or an ExecuTorch program (INT8 for ``int8``)."""
    example = data.example_input()
    if get_runtime(runtime).info.file_format == "pte":
        try:
            if precision == "int8":
                batches = calibration_batches(data, quantize, images=LATENCY_CALIBRATION_IMAGES)
                return quantize_pte(model, example, batches)
            return lower_pte(model, example)
        except Exception as exc:  # torch.export and the lowering passes raise many types
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            raise UsageError(
                f"ExecuTorch cannot lower this model to XNNPACK ({precision}): {reason}; "
                "search it with --runtime onnxruntime or openvino"
            ) from exc
    if precision == "int8":
        return int8_latency_model(model, data, quantize)
    return export_onnx(model, example)


def lower_pte(model: nn.Module | torch.export.ExportedProgram, example_input: torch.Tensor) -> bytes:
    """``model`` exported with ``torch.export`` and lowered to XNNPACK: the ``.pte`` program's bytes."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with _quiet():
        exported = model if isinstance(model, torch.export.ExportedProgram) else _export(model, example_input)
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    return bytes(program.buffer)


def quantize_pte(model: nn.Module, example_input: torch.Tensor, calibration: Iterable[np.ndarray]) -> bytes:
    """``model`` quantized to INT8 with ExecuTorch's XNNPACK quantizer (PT2E), calibrated, lowered to ``.pte``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with _quiet():
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(_export(model, example_input).module(), quantizer)
        with torch.no_grad():
            for batch in calibration:  # one image at a time: the program is exported for batch 1
                for image in np.ascontiguousarray(batch, dtype=np.float32):
                    prepared(torch.from_numpy(image[None]))
        converted = convert_pt2e(prepared)
        exported = torch.export.export(converted, (example_input,))
    return lower_pte(exported, example_input)


def _export(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` through ``torch.export``: a copy in contiguous (NCHW) memory format, since XNNPACK's lowering
    refuses weights left channels-last by training (``ChannelsLastTaggedReshapePass``)."""
    copy = copy_module(model).eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        return torch.export.export(copy, (example_input.contiguous(),))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ExecuTorch's lowering warns and logs at length about every partition; none of it is for the user."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
