"""What ``export`` ships for the study's runtime beside the ONNX files, checked like them.

* OpenVINO: the IR (``model.xml`` and ``model.bin``; ``model.int8.xml``/``.bin`` from the INT8 QDQ
  model), converted from the ONNX that was checked, FP32 weights kept (no FP16 compression).
* ExecuTorch: ``model.pte`` lowered from the fine-tuned model to XNNPACK, and ``model.int8.pte``
  quantized by ExecuTorch's XNNPACK quantizer with the trial's calibration settings (the same
  training images as the ONNX INT8 model). A ``.pte`` program takes batch 1.

Each FP32 file must agree with PyTorch within the ONNX check's tolerances, and each INT8 file
with its FP32 file in the same runtime on the held-out images, or nothing is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.candidate import Timer
from search.measuring.onnx_export import fix_batch
from search.measuring.quantize import QuantizeSettings, calibration_batches
from search.measuring.runtimes.base import one_image_at_a_time
from search.measuring.runtimes.lowering import lower_pte, quantize_pte
from search.measuring.runtimes.registry import get_runtime, require_runtime
from search.progress import Reporter
from search.shipping.checks import compare_logits
from search.shipping.settings import ExportSettings

__all__ = ["RuntimeCheckFailed", "ship_runtime_files", "timed_file_of"]


class RuntimeCheckFailed(UsageError, RuntimeError):
    """A runtime's shipped file failed a check; nothing was moved into the export folder."""


def ship_runtime_files(
    runtime: str,
    model: nn.Module,
    fp32_onnx: bytes,
    int8_onnx: bytes | None,
    quantization: dict[str, Any] | None,
    data: Dataset,
    split: str,
    settings: ExportSettings,
    work: Path,
    threads: int,
    reporter: Reporter,
) -> dict[str, Any] | None:
    """Write ``runtime``'s files into ``work`` and check them; the card's record (None for ONNX Runtime)."""
    engine = require_runtime(runtime)
    info = engine.info
    if runtime == "onnxruntime":
        return None
    reporter.phase(f"write and check the {runtime} files")
    fp32_path, int8_path = work / info.fp32_file, work / info.int8_file
    if runtime == "openvino":
        _save_ir(fp32_onnx, fp32_path)
        if int8_onnx is not None:
            _save_ir(int8_onnx, int8_path)
    else:
        example = data.example_input()
        fp32_path.write_bytes(lower_pte(model, example))
        if int8_onnx is not None:
            quantize = QuantizeSettings.from_dict(quantization or {})
            int8_path.write_bytes(quantize_pte(model, example, calibration_batches(data, quantize)))
    fp32_run = one_image_at_a_time(engine.load(str(fp32_path), threads))
    record: dict[str, Any] = {"runtime": runtime, "file": info.fp32_file}
    record["parity"] = _parity(model, fp32_run, data, split, settings, runtime)
    if int8_onnx is not None:
        int8_run = one_image_at_a_time(engine.load(str(int8_path), threads))
        record["int8"] = _int8_agreement(fp32_run, int8_run, data, split, settings, runtime)
        record["int8"]["file"] = info.int8_file
    return record


def _save_ir(onnx_model: bytes, path: Path) -> None:
    """The IR at batch 1, the shape the search timed: OpenVINO's CPU plugin compiles a model with a dynamic
    batch into slower kernels (MobileNetV2 at batch 1: 5-10% slower than static, BENCHMARKS.md "Runtimes"), so an IR
    loaded the obvious way (``compile_model("model.int8.xml")``) keeps the budget's promise. Other batch
    sizes: ``model.reshape`` before compiling."""
    from search.measuring.runtimes.openvino import import_openvino, read_model

    ov = import_openvino()

    ov.save_model(read_model(fix_batch(onnx_model)), str(path), compress_to_fp16=False)


def _parity(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    data: Dataset,
    split: str,
    settings: ExportSettings,
    runtime: str,
) -> dict[str, Any]:
    """The runtime's FP32 file against PyTorch on real images, with the ONNX check's tolerances."""
    result = compare_logits(model, run, data, split, settings)
    worst, scale, total, allowed = (
        result["max_abs_diff"],
        result["logit_scale"],
        result["images"],
        result["allowed_abs_diff"],
    )
    if worst > allowed or result["top1_agreement"] < settings.min_agreement:
        raise RuntimeCheckFailed(
            f"{runtime} disagrees with PyTorch: max |diff| {worst:.3g} on logits up to {scale:.3g} (allowed "
            f"{allowed:.3g}), top-1 agreement {result['top1_agreement']:.3f} on {total} images (needs "
            f"{settings.min_agreement:g}); nothing was exported"
        )
    return result


def _int8_agreement(
    fp32: Callable[[np.ndarray], np.ndarray],
    int8: Callable[[np.ndarray], np.ndarray],
    data: Dataset,
    split: str,
    settings: ExportSettings,
    runtime: str,
) -> dict[str, Any]:
    """How often the runtime's INT8 file predicts its FP32 file's top-1 class, and both files' top-1."""
    same = right_fp32 = right_int8 = seen = 0
    shuffle = settings.test_images is not None
    for x, y in data.batches(split, 32, shuffle=shuffle, augment=False, limit=settings.test_images):
        a, b = np.asarray(fp32(x.numpy())).argmax(1), np.asarray(int8(x.numpy())).argmax(1)
        labels = y.numpy()
        same += int((a == b).sum())
        right_fp32 += int((a == labels).sum())
        right_int8 += int((b == labels).sum())
        seen += len(labels)
    result = {
        "images": seen,
        "top1": right_int8 / max(seen, 1),
        "fp32_top1": right_fp32 / max(seen, 1),
        "top1_agreement_with_fp32": same / max(seen, 1),
        "min_agreement": settings.min_int8_agreement,
    }
    if result["top1_agreement_with_fp32"] < settings.min_int8_agreement:
        raise RuntimeCheckFailed(
            f"the {runtime} INT8 model agrees with its FP32 model on only {result['top1_agreement_with_fp32']:.1%} "
            f"of {split} images (needs {settings.min_int8_agreement:.0%}); nothing was exported"
        )
    return result


def timed_file_of(timer: Timer, work: Path, fp32_onnx: bytes, int8_onnx: bytes | None) -> bytes | str:
    """The shipped file (INT8 when there is one) as the timer's runtime times it, at batch 1.

    ONNX Runtime times the ONNX, OpenVINO its IR (here; a latency target gets the ONNX it was converted
    from, as one file), ExecuTorch its ``.pte``.
    """
    info = get_runtime(timer.runtime).info
    name = info.fp32_file if int8_onnx is None else info.int8_file
    if info.file_format == "pte":
        return (work / name).read_bytes()
    if timer.runtime == "openvino" and timer.where == "local":
        return str(work / name)
    return fix_batch(fp32_onnx if int8_onnx is None else int8_onnx)
