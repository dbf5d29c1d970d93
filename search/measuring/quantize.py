"""INT8 post-training quantization in ONNX Runtime.

A policy's ``precision`` is ``fp32`` or ``int8``. An ``int8`` candidate is the pruned (and, if
it is within the budget, fine-tuned) FP32 model exported to ONNX and quantized statically by
ONNX Runtime: QDQ format, per-channel symmetric INT8 weights, UINT8 activations calibrated on
training images (U8S8, the combination ONNX Runtime's x86 kernels run fastest). Its latency is
timed on the quantized model (:mod:`search.measuring.candidate`) and its accuracy is measured by
running the quantized model in ONNX Runtime (:func:`search.training.evaluate.onnx_top1`), never
by the FP32 PyTorch model. Whether INT8 pays here is :mod:`search.measuring.int8_check`'s question.

Export uses :func:`quantize_model` (or :func:`quantize_onnx` on an FP32 ONNX it wrote).
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from search.data.dataset import Dataset
from search.measuring.hardware import cpu_flags
from search.measuring.onnx_export import export_onnx, fixed_batch

__all__ = [
    "CALIBRATION_METHODS",
    "LATENCY_CALIBRATION_IMAGES",
    "QuantizeSettings",
    "QuantizedModel",
    "calibration_batches",
    "int8_latency_model",
    "quantization_unavailable",
    "quantize_model",
    "quantize_onnx",
]

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
"""ONNX Runtime's activation-range calibrators (``CalibrationMethod.MinMax`` and so on)."""

LATENCY_CALIBRATION_IMAGES = 32
"""Calibration images for a model quantized only to be timed: the ranges change the scales, not
the kernels that run, so a full calibration is spent only on models whose accuracy is measured."""


@dataclass(frozen=True)
class QuantizeSettings:
    """How INT8 models are made (recorded on every INT8 trial)."""

    calibration_method: str = "minmax"
    """One of :data:`CALIBRATION_METHODS`."""
    calibration_images: int = 256
    """Training images (no augmentation, a fixed shuffled subset) that calibrate activation ranges."""
    calibration_batch: int = 32
    """Images per calibration batch."""
    seed: int = 0
    """Which training images calibrate (the same ones for every trial of a study)."""
    reduce_range: bool | None = None
    """Quantize weights to 7 bits. ``None`` decides by CPU: on x86 without VNNI, ONNX Runtime's fast
    U8S8 kernels (``vpmaddubsw``) saturate full-range 8-bit weights, which cost a briefly trained
    ResNet-18 half its top-1 agreement with FP32 on the development machine; 7 bits avoid that."""

    def __post_init__(self) -> None:
        if self.reduce_range is None:
            object.__setattr__(self, "reduce_range", _saturating_cpu())
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}"
            )
        if self.calibration_images < 1 or self.calibration_batch < 1:
            raise ValueError("calibration_images and calibration_batch must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizeSettings:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class QuantizedModel:
    """An FP32 model and its INT8 version, both ONNX with a dynamic batch dimension."""

    fp32_onnx: bytes
    int8_onnx: bytes
    seconds: float
    """Export, calibration and quantization time."""


def quantization_unavailable() -> str | None:
    """Why ONNX Runtime's quantization tools cannot be used here, or None when they can."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken optional dependency inside it
        return f"onnxruntime.quantization cannot be imported ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def calibration_batches(data: Dataset, settings: QuantizeSettings, *, images: int | None = None) -> list[np.ndarray]:
    """Normalised training images (float32 NCHW numpy batches) that calibrate activation ranges."""
    limit = settings.calibration_images if images is None else min(images, settings.calibration_images)
    return [
        x.numpy()
        for x, _ in data.batches(
            "train", settings.calibration_batch, shuffle=True, augment=False, seed=settings.seed, limit=limit
        )
    ]


def quantize_onnx(fp32_onnx: bytes, calibration: Iterable[np.ndarray], settings: QuantizeSettings) -> bytes:
    """Static INT8 quantization of an FP32 ONNX model (QDQ, per-channel INT8 weights, UINT8 activations).

    ``calibration`` yields normalised float32 NCHW batches; a model with a fixed batch
    dimension is fed slices of that size. The model is pre-processed first (shape inference
    and graph optimisation, as ONNX Runtime recommends) and keeps its input and output names.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    model = onnx.load_from_string(fp32_onnx)
    input_name = model.graph.input[0].name
    batch = fixed_batch(model)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.calibration_method]
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        output = Path(tmp) / "int8.onnx"
        with _quiet():
            quant_pre_process(model, prepared)
            quantize_static(
                str(prepared),
                str(output),
                _Reader(input_name, _rechunk(calibration, batch)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=bool(settings.reduce_range),
                calibrate_method=method,
            )
        return output.read_bytes()


def quantize_model(
    model: nn.Module, data: Dataset, settings: QuantizeSettings, *, calibration_images: int | None = None
) -> QuantizedModel:
    """Export ``model`` (dynamic batch) and quantize it, calibrated on ``data``'s training images."""
    started = time.perf_counter()
    fp32 = export_onnx(model, data.example_input(), dynamic_batch=True)
    int8 = quantize_onnx(fp32, calibration_batches(data, settings, images=calibration_images), settings)
    return QuantizedModel(fp32_onnx=fp32, int8_onnx=int8, seconds=time.perf_counter() - started)


def int8_latency_model(model: nn.Module, data: Dataset, settings: QuantizeSettings) -> bytes:
    """The INT8 model to time: the batch-1 export FP32 models are timed as, calibrated on a few images."""
    fp32 = export_onnx(model, data.example_input())
    return quantize_onnx(fp32, calibration_batches(data, settings, images=LATENCY_CALIBRATION_IMAGES), settings)


# --------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ONNX Runtime's quantization tools, which print progress and log to the root logger."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)  # so that logging.warning() does not install a stderr handler (basicConfig)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
        root.removeHandler(guard)


class _Reader:
    """An ONNX Runtime calibration data reader (it duck-types ``CalibrationDataReader``) over batches."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self._input = input_name
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def _saturating_cpu() -> bool:
    """True on x86 CPUs whose INT8 dot products go through ``vpmaddubsw`` (no VNNI, no AMX)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def _rechunk(batches: Iterable[np.ndarray], size: int | None) -> Iterator[np.ndarray]:
    for batch in batches:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if size is None:
            yield batch
        else:
            for start in range(0, len(batch) - size + 1, size):
                yield batch[start : start + size]
