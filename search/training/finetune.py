"""Training loops: BatchNorm recalibration, brief fine-tuning (optionally distilled), baselines.

All training uses channels_last and runs on :attr:`TrainSettings.device` (the CPU or a CUDA
device), with mixed precision where that device computes it natively
(:func:`search.training.device.precision`: bf16, or fp16 with loss scaling on older GPUs; on a
CPU without native bf16 it is emulated and an order of magnitude slower, so FP32). The model
(and the teacher) go to the device for the call and come back to the CPU afterwards, where
pruning, export and latency happen.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search.data.dataset import Dataset
from search.progress import NullReporter, Reporter
from search.training.device import precision

__all__ = [
    "FinetuneResult",
    "TrainSettings",
    "arithmetic",
    "device_of",
    "on_device",
    "recalibrate_batchnorm",
    "to_device",
    "train",
]


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 0.01
    """Peak learning rate (SGD, Nesterov momentum 0.9); warm-up then cosine decay to zero."""
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    distill: float = 0.0
    """Weight of distillation from the unpruned model (0 = cross-entropy only, 1 = only KD)."""
    temperature: float = 4.0
    train_dtype: str = "auto"
    """``auto`` (bf16 autocast where the device has native bf16, fp16 on older GPUs), ``bf16``, ``fp16`` or ``fp32``."""
    seed: int = 0
    device: str = "cpu"
    """Where to train: ``cpu`` or ``cuda:N`` (resolved by :func:`search.training.device.resolve`)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError("distill must be in [0, 1]")
        if self.train_dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError("train_dtype must be auto, bf16, fp16 or fp32")


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    """Steps run by this call (fewer than asked when it resumed from a checkpoint)."""
    seconds: float
    """Training seconds of the whole fine-tune: a resumed call adds those its checkpoint recorded."""
    images_per_second: float
    final_loss: float


def _forever(
    data: Dataset, batch_size: int, seed: int, first_epoch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for epoch in itertools.count(first_epoch):
        yield from data.batches("train", batch_size, shuffle=True, augment=True, seed=seed + epoch)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: Dataset,
    *,
    batches: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> None:
    """Re-estimate BatchNorm running statistics on training batches (no weight changes).

    After channels are removed, the statistics the remaining BatchNorms saw no longer match
    their inputs; a few forward passes in train mode with cumulative averaging fix that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    with on_device(device, model):
        stream = data.batches("train", batch_size, shuffle=True, augment=False, seed=seed)
        try:
            for x, _ in itertools.islice(stream, batches):
                model(to_device(x, device))
        finally:
            stream.close()  # loader workers stop here, before anything is timed
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (it goes back there after a call on another device)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def on_device(device: str | torch.device, *models: nn.Module | None) -> Iterator[None]:
    """``models`` (None skipped) on ``device`` in channels_last for the block, then back where each was."""
    moved = [m for m in models if m is not None]
    homes = [device_of(m) for m in moved]
    for m in moved:
        m.to(device, memory_format=torch.channels_last)  # in place: nn.Module.to returns the module itself
    try:
        yield
    finally:
        for m, home in zip(moved, homes, strict=True):
            m.to(home)


def arithmetic(device: str | torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``'s kind (a training step's mixed precision, the probes' bf16 reads), or a
    disabled one (FP32) where ``dtype`` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A batch on ``device`` in channels_last (asynchronously from pinned memory)."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def train(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    *,
    teacher: nn.Module | None = None,
    reporter: Reporter | None = None,
    description: str = "fine-tune",
    steps_per_epoch: int | None = None,
    checkpoint: Path | None = None,
    after_epoch: Callable[[int, nn.Module], None] | None = None,
    features: Any = None,
) -> FinetuneResult:
    """Train ``model`` for ``settings.steps`` SGD steps on the training split.

    With ``checkpoint`` and ``steps_per_epoch``, the model, optimizer and schedule are saved at
    the end of every epoch and after the last step, and a later call with the same arguments
    resumes from the last save instead of starting again. ``after_epoch(epoch, model)`` is called at the end of
    every epoch (numbered from 1; a last, partial one counts), in eval mode, before it is saved.
    ``features`` (a :class:`~search.training.feature_distill.FeatureDistiller` of ``model`` and
    ``teacher``) adds its loss, and its adapters train (and are checkpointed) beside the model.
    """
    reporter = reporter or NullReporter()
    if settings.steps == 0:
        return FinetuneResult(0, 0.0, 0.0, float("nan"))
    torch.manual_seed(settings.seed)
    model.train()
    if teacher is not None and (settings.distill > 0 or features is not None):
        teacher.eval()
    else:
        teacher = None
    hooked = features.attached() if features is not None else nullcontext()
    with on_device(settings.device, model, teacher, features), hooked:
        return _train(
            model, data, settings, teacher, reporter, description, steps_per_epoch, checkpoint, after_epoch, features
        )


def _train(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    teacher: nn.Module | None,
    reporter: Reporter,
    description: str,
    steps_per_epoch: int | None,
    checkpoint: Path | None,
    after_epoch: Callable[[int, nn.Module], None] | None,
    features: Any = None,
) -> FinetuneResult:
    """:func:`train` with the models already on the device."""
    device = torch.device(settings.device)
    mixed = precision(device, settings.train_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed.scale_loss)
    decay, no_decay = [], []
    for p in itertools.chain(model.parameters(), features.parameters() if features is not None else ()):
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        momentum=0.9,
        nesterov=True,
    )
    warmup = max(1, int(settings.steps * settings.warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    done, before, images_before = 0, 0.0, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if features is not None:
            features.load_state_dict(state["features"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done = int(state["step"])
        before = float(state.get("seconds", 0.0))  # (checkpoints older than this field: the seconds are lost)
        images_before = int(state.get("images", done * settings.batch_size))
    epoch_length = steps_per_epoch or settings.steps
    stream = _forever(data, settings.batch_size, settings.seed, first_epoch=done // epoch_length)
    start = time.perf_counter()
    images = 0
    loss_value = float("nan")
    try:
        with reporter.task(description, settings.steps) as task:
            task.advance(done)
            for step in range(done, settings.steps):
                x, y = next(stream)
                x, y = to_device(x, device), y.to(device, non_blocking=True)
                with arithmetic(device, mixed.dtype):
                    logits = model(x)
                    loss = _loss(logits, y, x, teacher, settings)
                    if features is not None:
                        loss = loss + features.loss()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                images += len(y)
                loss_value = float(loss.detach())
                elapsed = time.perf_counter() - start
                task.advance(1, loss=loss_value, img_s=images / max(elapsed, 1e-9))
                epoch_ends = steps_per_epoch and (step + 1) % steps_per_epoch == 0
                if after_epoch is not None and steps_per_epoch and (epoch_ends or step + 1 == settings.steps):
                    model.eval()
                    after_epoch(math.ceil((step + 1) / steps_per_epoch), model)
                    model.train()
                if checkpoint is not None and (epoch_ends or step + 1 == settings.steps):
                    # the last step too: a run that dies after its fine-tune (a partial last epoch) never redoes it
                    seconds = before + time.perf_counter() - start
                    trained = images_before + images
                    _save_state(checkpoint, model, optimizer, scheduler, step + 1, seconds, trained, features)
    finally:
        stream.close()  # loader workers stop before anything is timed
    model.eval()
    seconds = before + time.perf_counter() - start  # a resumed fine-tune counts the runs before it too
    rate = (images_before + images) / seconds if images_before + images else 0.0
    return FinetuneResult(settings.steps - done, seconds, rate, loss_value)


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    step: int,
    seconds: float,
    images: int,
    features: Any = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if features is not None:
        state["features"] = features.state_dict()
    torch.save({**state, "step": step, "seconds": seconds, "images": images}, partial)
    os.replace(partial, path)


def _loss(
    logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, teacher: nn.Module | None, settings: TrainSettings
) -> torch.Tensor:
    logit_distill = teacher is not None and settings.distill > 0
    hard = F.cross_entropy(logits.float(), y, label_smoothing=0.0 if logit_distill else 0.1)
    if teacher is None:
        return hard
    with torch.no_grad():
        target = teacher(x).float()  # also when only feature distillation needs the teacher's forward
    if not logit_distill:
        return hard
    t = settings.temperature
    soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.softmax(target / t, dim=1), reduction="batchmean") * (
        t * t
    )
    return settings.distill * soft + (1.0 - settings.distill) * hard
