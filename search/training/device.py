"""Where training and evaluation run: ``--device auto|cpu|cuda|cuda:N``, and what each device supports.

Latency is never measured here: it stays an ONNX Runtime measurement on the CPU (or the latency
target), so this only decides where PyTorch trains, recalibrates and scores models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from search.errors import UsageError
from search.measuring.hardware import cpu_model, supports_bf16
from search.training.device_names import DEVICE_FORMS, normalise_device

__all__ = ["DEVICE_FORMS", "Precision", "check_device_text", "device_record", "loader_plan", "precision", "resolve"]


def check_device_text(text: str) -> str:
    """``text`` normalised (lower case, trimmed) when it is one of :data:`DEVICE_FORMS`."""
    value = normalise_device(text)
    if value is None:
        raise UsageError(f"unknown device {text!r}; use {DEVICE_FORMS}")
    return value


def resolve(text: str) -> torch.device:
    """The device ``text`` names, checked against this machine (``auto``: the first CUDA device if any)."""
    value = check_device_text(text)
    available = torch.cuda.is_available()
    if value == "auto":
        return torch.device("cuda:0" if available else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not available:
        raise UsageError(f"--device {value}: PyTorch sees no CUDA device on this machine; pass --device cpu (or auto)")
    index = int(value.split(":", 1)[1]) if ":" in value else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(
            f"--device {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; pick one of them"
        )
    return torch.device("cuda", index)


def device_record(device: torch.device) -> dict[str, Any]:
    """The device as recorded on a study, its trials and an export card: kind, index and name."""
    if device.type == "cuda":
        index = device.index or 0
        return {"kind": "cuda", "device": f"cuda:{index}", "name": torch.cuda.get_device_name(index)}
    return {"kind": device.type, "device": device.type, "name": cpu_model()}


@dataclass(frozen=True)
class Precision:
    """How a training step computes on a device: the autocast dtype (None: FP32) and whether to scale losses."""

    dtype: torch.dtype | None
    scale_loss: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def precision(device: torch.device, train_dtype: str) -> Precision:
    """``train_dtype`` (auto, bf16, fp16, fp32) on ``device``.

    ``auto``: bf16 where the device computes it natively (a CUDA device that supports it, a CPU
    with AVX-512 BF16 or AMX), fp16 with loss scaling on older GPUs, FP32 on other CPUs.
    """
    cuda = device.type == "cuda"
    if train_dtype == "fp32":
        return Precision(None, False)
    if train_dtype == "bf16":
        return Precision(torch.bfloat16, False)
    if train_dtype == "fp16":
        if not cuda:
            raise UsageError("fp16 training needs a CUDA device; on the CPU use bf16 or fp32")
        return Precision(torch.float16, True)
    if cuda:
        bf16 = torch.cuda.is_bf16_supported()
        return Precision(torch.bfloat16, False) if bf16 else Precision(torch.float16, True)
    return Precision(torch.bfloat16 if supports_bf16() else None, False)


def loader_plan(device: torch.device, cpus: int | None = None) -> tuple[int, bool]:
    """(loader worker processes, pinned memory) for batches read from disk while training on ``device``.

    A GPU leaves the CPU free to feed it: up to 8 workers, one core kept for the training loop,
    pinned memory. Training on the CPU uses its cores itself, so only machines with many cores
    give some (a quarter, at most 4) to loading.
    """
    cores = cpus if cpus is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if device.type == "cuda":
        return min(8, max(1, cores - 1)), True
    return min(4, cores // 4), False
