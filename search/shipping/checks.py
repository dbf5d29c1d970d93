"""What an export must pass before it is written: ONNX Runtime agrees with PyTorch, and INT8 with FP32."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from search.data.dataset import Dataset
from search.errors import UsageError
from search.measuring.quantize import QuantizeSettings, calibration_batches, quantize_onnx
from search.measuring.timing import open_session
from search.progress import Reporter
from search.shipping.settings import ExportSettings
from search.training.evaluate import compare_top1

__all__ = ["CheckFailed", "check_parity", "compare_logits", "quantize_and_check"]


class CheckFailed(UsageError, RuntimeError):
    """An exported model failed a check; nothing of it was moved into the export folder."""


def check_parity(
    model: nn.Module, onnx_model: bytes, data: Dataset, split: str, settings: ExportSettings, threads: int
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on real images; raises :class:`CheckFailed` past the tolerances.

    Logits may differ by ``max_abs_diff`` or by ``max_rel_diff`` of the logits' scale (their largest
    magnitude), whichever is larger: float rounding grows with a model's depth and its logits, so an
    absolute bar alone refuses correct exports of larger models. Top-1 must agree as well.
    """
    session = open_session(onnx_model, threads)
    compared = compare_logits(model, lambda x: session.run(None, {"input": x})[0], data, split, settings)
    worst, scale, total, allowed = (
        compared["max_abs_diff"],
        compared["logit_scale"],
        compared["images"],
        compared["allowed_abs_diff"],
    )
    result = {
        "images": total,
        "max_abs_diff": worst,
        "logit_scale": scale,
        "max_rel_diff": worst / scale if scale else 0.0,
        "top1_agreement": compared["top1_agreement"],
        "tolerance": settings.max_abs_diff,
        "rel_tolerance": settings.max_rel_diff,
        "min_agreement": settings.min_agreement,
    }
    if worst > allowed or result["top1_agreement"] < settings.min_agreement:
        raise CheckFailed(
            f"ONNX Runtime disagrees with PyTorch: max |diff| {worst:.3g} on logits up to {scale:.3g} "
            f"(allowed {allowed:.3g}: {settings.max_abs_diff:g} or {settings.max_rel_diff:g} of the scale), "
            f"top-1 agreement {result['top1_agreement']:.3f} on {total} images (needs {settings.min_agreement:g}); "
            "nothing was exported"
        )
    return result


def compare_logits(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    data: Dataset,
    split: str,
    settings: ExportSettings,
) -> dict[str, Any]:
    """``run`` (a runtime's file, on a batch of images) against PyTorch's ``model`` on ``settings.parity_images``
    of ``split``: the largest logit difference, the logits' scale, top-1 agreement and the difference allowed
    (``max_abs_diff``, or ``max_rel_diff`` of the scale, whichever is larger). Whoever calls it decides."""
    worst = scale = 0.0
    agree = total = 0
    for x, _ in data.batches(split, 32, shuffle=False, augment=False, limit=settings.parity_images):
        with torch.inference_mode():
            expected = model(x).numpy()
        got = np.asarray(run(x.numpy()))
        worst = max(worst, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(x)
    return {
        "images": total,
        "max_abs_diff": worst,
        "logit_scale": scale,
        "top1_agreement": agree / max(total, 1),
        "allowed_abs_diff": max(settings.max_abs_diff, settings.max_rel_diff * scale),
    }


def quantize_and_check(
    model: nn.Module,
    fp32_onnx: bytes,
    data: Dataset,
    split: str,
    settings: ExportSettings,
    trial: optuna.trial.FrozenTrial,
    threads: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """The INT8 model as the search made it (same calibration settings), checked against FP32."""
    recorded = trial.user_attrs.get("quantization", {})
    quantize = QuantizeSettings.from_dict(recorded)
    int8_onnx = quantize_onnx(fp32_onnx, calibration_batches(data, quantize), quantize)
    agreement = compare_top1(
        fp32_onnx, int8_onnx, data, split, threads=threads, limit=settings.test_images, reporter=reporter
    )
    result: dict[str, Any] = {
        "onnx": int8_onnx,
        "quantization": quantize.to_dict(),
        "top1": agreement.top1_b,
        "fp32_top1_onnxruntime": agreement.top1_a,
        "top1_agreement_with_fp32": agreement.agreement,
        "images": agreement.images,
        "min_agreement": settings.min_int8_agreement,
    }
    if agreement.agreement < settings.min_int8_agreement:
        raise CheckFailed(
            f"the INT8 model agrees with the FP32 model on only {agreement.agreement:.1%} of {split} images "
            f"(needs {settings.min_int8_agreement:.0%}); nothing was exported; try --calibration-method entropy "
            "in the search"
        )
    return result
