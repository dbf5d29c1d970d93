"""INT8 post-training quantization in ONNX Runtime, and top-1 of ONNX models on a data split.

A policy's ``precision`` is ``fp32`` or ``int8``. An ``int8`` candidate is the pruned (and, if
it is within the budget, fine-tuned) FP32 model exported to ONNX and quantized statically by
ONNX Runtime: QDQ format, per-channel symmetric INT8 weights, UINT8 activations calibrated on
training images (U8S8, the combination ONNX Runtime's x86 kernels run fastest). Its latency is
timed on the quantized model and its accuracy is measured by running the quantized model in
ONNX Runtime, never by the FP32 PyTorch model.

Whether INT8 pays is a property of the CPU (VNNI or AMX make it several times faster; plain
AVX2 may not), so :func:`check_int8` measures the quantized baseline against the FP32 one
before a study lets the search choose it.

Export uses :func:`quantize_model` (or :func:`quantize_onnx` on an FP32 ONNX it wrote),
:func:`onnx_top1` and :func:`compare_top1` / :func:`top1_agreement`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
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

from search.data import Dataset
from search.errors import UsageError
from search.hardware import cpu_flags
from search.latency import LatencySettings, export_onnx, measure, open_session
from search.progress import NullReporter, Reporter

__all__ = [
    "CALIBRATION_METHODS",
    "LATENCY_CALIBRATION_IMAGES",
    "MAX_INT8_RATIO",
    "Agreement",
    "Int8Check",
    "QuantizeSettings",
    "QuantizedModel",
    "calibration_batches",
    "check_int8",
    "choose_precisions",
    "compare_top1",
    "fix_batch",
    "int8_latency_model",
    "onnx_top1",
    "quantization_unavailable",
    "quantize_model",
    "quantize_onnx",
    "top1_agreement",
]

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
"""ONNX Runtime's activation-range calibrators (``CalibrationMethod.MinMax`` and so on)."""

MAX_INT8_RATIO = 0.95
"""INT8 joins the search only if the quantized baseline takes at most this fraction of FP32's time."""

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


@dataclass(frozen=True)
class Agreement:
    """Two ONNX models run on the same images: each one's top-1 and how often their top-1 agree."""

    top1_a: float
    top1_b: float
    agreement: float
    """Fraction of images on which both models predict the same class."""
    images: int


@dataclass(frozen=True)
class Int8Check:
    """Whether INT8 is worth searching on this machine, measured on the unpruned model."""

    available: bool
    """False when quantization is missing or failed (``reason`` says why)."""
    ratio: float | None
    """INT8 baseline median over the FP32 baseline median, timed interleaved; None if not measured."""
    int8_median_ms: float | None
    fp32_median_ms: float | None
    seconds: float
    reason: str = ""

    @property
    def faster(self) -> bool:
        return self.available and self.ratio is not None and self.ratio <= MAX_INT8_RATIO

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "int8_median_ms": None if self.int8_median_ms is None else round(self.int8_median_ms, 4),
            "fp32_median_ms": None if self.fp32_median_ms is None else round(self.fp32_median_ms, 4),
            "max_ratio": MAX_INT8_RATIO,
            "faster": self.faster,
            "seconds": round(self.seconds, 2),
            "reason": self.reason,
        }


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
    batch = _fixed_batch(model)
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


def fix_batch(onnx_model: bytes, batch: int = 1) -> bytes:
    """The model with its symbolic batch dimension fixed to ``batch`` (a dynamic export, timed like a static one)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load_from_string(onnx_model)
    dims = {
        d.dim_param
        for v in model.graph.input
        for d in v.type.tensor_type.shape.dim[:1]
        if d.HasField("dim_param") and d.dim_param
    }
    for name in dims:
        make_dim_param_fixed(model.graph, name, batch)
    return model.SerializeToString()


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


def onnx_top1(
    onnx_model: bytes,
    data: Dataset,
    split: str = "val",
    *,
    threads: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> float:
    """Fraction of images in ``split`` whose highest logit is the true class, run in ONNX Runtime."""
    correct = seen = 0
    for logits, labels in _logits([onnx_model], data, split, threads, batch_size, limit, reporter):
        correct += int((logits[0].argmax(axis=1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError(f"split {split!r} is empty")
    return correct / seen


def compare_top1(
    onnx_a: bytes,
    onnx_b: bytes,
    data: Dataset,
    split: str = "val",
    *,
    threads: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> Agreement:
    """Both models on the same images in one pass: each top-1, and how often their predictions agree."""
    correct_a = correct_b = same = seen = 0
    for (logits_a, logits_b), labels in _logits([onnx_a, onnx_b], data, split, threads, batch_size, limit, reporter):
        pred_a, pred_b = logits_a.argmax(axis=1), logits_b.argmax(axis=1)
        correct_a += int((pred_a == labels).sum())
        correct_b += int((pred_b == labels).sum())
        same += int((pred_a == pred_b).sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError(f"split {split!r} is empty")
    return Agreement(top1_a=correct_a / seen, top1_b=correct_b / seen, agreement=same / seen, images=seen)


def top1_agreement(
    onnx_a: bytes, onnx_b: bytes, data: Dataset, split: str = "val", *, threads: int | None = None
) -> float:
    """Fraction of ``split``'s images on which the two models' top-1 predictions are the same class."""
    return compare_top1(onnx_a, onnx_b, data, split, threads=threads).agreement


def check_int8(
    baseline: nn.Module,
    baseline_onnx: bytes,
    data: Dataset,
    settings: QuantizeSettings,
    latency: LatencySettings,
) -> Int8Check:
    """Quantize the unpruned model and time it interleaved with the FP32 baseline ONNX."""
    started = time.perf_counter()
    missing = quantization_unavailable()
    if missing is not None:
        return Int8Check(False, None, None, None, time.perf_counter() - started, reason=missing)
    try:
        int8 = int8_latency_model(baseline, data, settings)
        measured = measure(int8, tuple(data.example_input().shape), latency, reference=baseline_onnx)
    except Exception as exc:  # any failure of the quantizer means: search FP32 only, and say why
        reason = f"quantizing the baseline failed ({type(exc).__name__}: {exc})".splitlines()[0]
        return Int8Check(False, None, None, None, time.perf_counter() - started, reason=reason)
    return Int8Check(
        available=True,
        ratio=measured.ratio,
        int8_median_ms=measured.median_ms,
        fp32_median_ms=measured.reference_median_ms,
        seconds=time.perf_counter() - started,
    )


def choose_precisions(
    allowed: tuple[str, ...],
    baseline: nn.Module,
    baseline_onnx: bytes,
    data: Dataset,
    settings: QuantizeSettings,
    latency: LatencySettings,
    reporter: Reporter,
) -> tuple[tuple[str, ...], Int8Check | None]:
    """The precisions a new study searches: ``allowed`` without int8 unless INT8 is measured faster here.

    Says once (a warning) when int8 is dropped; a search that allowed only int8 cannot drop it
    and raises :class:`UsageError` instead.
    """
    if "int8" not in allowed:
        return allowed, None
    reporter.phase("quantize the baseline to INT8 and time it")
    check = check_int8(baseline, baseline_onnx, data, settings, latency)
    if check.faster:
        assert check.ratio is not None
        reporter.info(
            f"INT8 baseline: {check.int8_median_ms:.2f} ms, {check.ratio:.0%} of FP32 timed alongside it "
            f"({check.fp32_median_ms:.2f} ms); the search may quantize"
        )
        return allowed, check
    if check.available:
        why = f"the INT8 baseline takes {check.ratio:.0%} of FP32's time on this CPU (needs <= {MAX_INT8_RATIO:.0%})"
    else:
        why = check.reason
    kept = tuple(p for p in allowed if p != "int8")
    if not kept:
        raise UsageError(f"INT8 is not worth searching here: {why}; use --precision fp32 or fp32,int8")
    reporter.warn(f"INT8 is not searched: {why}; searching {', '.join(kept)} only")
    return kept, check


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


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The input's batch size if it is a fixed number, None if it is symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None


def _rechunk(batches: Iterable[np.ndarray], size: int | None) -> Iterator[np.ndarray]:
    for batch in batches:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if size is None:
            yield batch
        else:
            for start in range(0, len(batch) - size + 1, size):
                yield batch[start : start + size]


def _logits(
    models: list[bytes],
    data: Dataset,
    split: str,
    threads: int | None,
    batch_size: int,
    limit: int | None,
    reporter: Reporter | None,
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Each model's logits on every batch of ``split`` (models with a fixed batch of 1 get one image at a time)."""
    reporter = reporter or NullReporter()
    threads = threads or max(1, os.cpu_count() or 1)
    parsed = [onnx.load_from_string(m) for m in models]
    step = 1 if any(_fixed_batch(p) == 1 for p in parsed) else batch_size
    sessions = [open_session(m, threads) for m in models]
    names = [s.get_inputs()[0].name for s in sessions]
    total = len(data.split(split)) if limit is None else min(limit, len(data.split(split)))
    with reporter.task(f"ONNX Runtime top-1 on {split}", total) as task:
        for x, y in data.batches(split, batch_size, shuffle=limit is not None, augment=False, limit=limit):
            feed = x.numpy()
            outputs = []
            for session, name in zip(sessions, names, strict=True):
                parts = [session.run(None, {name: feed[i : i + step]})[0] for i in range(0, len(feed), step)]
                outputs.append(np.concatenate(parts))
            yield outputs, y.numpy()
            task.advance(len(y))
