"""What an export must pass before it is written: ONNX Runtime agrees with PyTorch, and INT8 with FP32."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from search.data.dataset import Dataset
from search.measuring.quantize import QuantizeSettings, calibration_batches, quantize_onnx
from search.measuring.timing import open_session
from search.progress import Reporter
from search.shipping.settings import ExportSettings
from search.training.evaluate import compare_top1

__all__ = ["check_parity", "quantize_and_check"]


def check_parity(
    model: nn.Module, onnx_model: bytes, data: Dataset, split: str, settings: ExportSettings, threads: int
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on real images; raises if they disagree past the tolerances."""
    session = open_session(onnx_model, threads)
    worst = 0.0
    agree = total = 0
    for x, _ in data.batches(split, 32, shuffle=False, augment=False, limit=settings.parity_images):
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(x)
    result = {
        "images": total,
        "max_abs_diff": worst,
        "top1_agreement": agree / max(total, 1),
        "tolerance": settings.max_abs_diff,
        "min_agreement": settings.min_agreement,
    }
    if worst > settings.max_abs_diff or result["top1_agreement"] < settings.min_agreement:
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: {result}")
    return result


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
        raise RuntimeError(
            f"the INT8 model agrees with the FP32 model on only {agreement.agreement:.1%} of {split} images "
            f"(needs {settings.min_int8_agreement:.0%}); try --calibration-method entropy in the search"
        )
    return result
