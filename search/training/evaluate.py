"""Top-1 accuracy on a split of a dataset: of a PyTorch model, or of ONNX models run in ONNX Runtime.

INT8 models are scored by running them in ONNX Runtime (never by the FP32 PyTorch model), and
export compares an INT8 model with its FP32 export image by image (:func:`compare_top1`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from search.data.dataset import Dataset
from search.measuring.onnx_export import export_onnx, fixed_batch
from search.measuring.timing import open_session
from search.progress import NullReporter, Reporter
from search.training.finetune import arithmetic, on_device, to_device

__all__ = [
    "BF16_ENGINE",
    "Agreement",
    "compare_top1",
    "onnx_correct_batches",
    "onnx_top1",
    "onnx_top1_correct",
    "read_top1_correct",
    "reads_whole_split",
    "subset_limit",
    "top1",
    "top1_agreement",
    "top1_correct",
    "top1_correct_batches",
]


BF16_ENGINE = "pytorch-bf16"
"""The engine name of a read in PyTorch under bf16 autocast (:func:`read_top1_correct`)."""


def subset_limit(size: int, limit: int | None) -> int | None:
    """``limit`` when it reads a subset of a split of ``size`` images; None when it covers the whole split.

    A subset is read in a fixed shuffled order; the whole split always in its own order, so two reads of every
    image (a trial's brief score and a promotion's) pair image by image whatever ``limit`` they were given.
    """
    return None if limit is None or limit >= size else limit


def reads_whole_split(data: Dataset, limit: int | None, split: str = "val") -> bool:
    """A read of ``split`` with ``limit`` covers all of it, in its own order (:func:`subset_limit`)."""
    return subset_limit(len(data.split(split)), limit) is None


def top1(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of images in ``split`` whose highest logit is the true class (FP32, eval mode).

    ``limit`` evaluates a fixed random subset of that many images (the same one on every call), so
    a class-sorted split still gives every class its share. The model runs on ``device`` and
    goes back to where it was.
    """
    correct = top1_correct(model, data, split, batch_size=batch_size, limit=limit, reporter=reporter, device=device)
    return float(correct.mean())


@torch.no_grad()  # not inference_mode: the channels_last copy of the weights must stay trainable
def top1_correct(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
    device: str | torch.device = "cpu",
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Per image of ``split`` (in the fixed evaluation order of :func:`top1`): is its highest logit the true class.

    ``autocast``: run the model under autocast to this dtype (bf16: :func:`top1_correct_batches`); FP32 otherwise."""
    reporter = reporter or NullReporter()
    model.eval()
    total = len(getattr(data, split))
    limit = subset_limit(total, limit)
    if limit is not None:
        total = min(total, limit)
    hits: list[torch.Tensor] = []
    seen = 0
    with on_device(device, model):
        stream = data.batches(split, batch_size, shuffle=limit is not None, augment=False, limit=limit)
        try:
            with reporter.task(f"top-1 on {split}", total) as task:
                for x, y in stream:
                    with arithmetic(device, autocast):
                        logits = model(to_device(x, device))
                    hits.append(logits.argmax(dim=1) == y.to(device, non_blocking=True))  # no sync
                    seen += len(y)
                    task.advance(len(y))
        finally:
            stream.close()
    if seen == 0:
        raise ValueError(f"split {split!r} is empty")
    return torch.cat(hits).cpu().numpy().astype(bool)


def top1_correct_batches(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    autocast: torch.dtype | None = None,
) -> Iterator[np.ndarray]:
    """:func:`top1_correct` batch by batch, the same images in the same order: a reader that has seen enough
    closes the iterator and no further image is read (the model goes back where it was).

    ``autocast``: under autocast to this dtype, e.g. bf16, which a CPU with native bf16 runs about twice as fast
    (the latency-aware tables' probes, :mod:`search.study.sensitivity`); FP32 otherwise."""
    model.eval()
    limit = subset_limit(len(getattr(data, split)), limit)
    with on_device(device, model):
        stream = data.batches(split, batch_size, shuffle=limit is not None, augment=False, limit=limit)
        try:
            for x, y in stream:
                with torch.no_grad(), arithmetic(device, autocast):  # per batch, not left on between yields
                    predicted = model(to_device(x, device)).argmax(dim=1).cpu()
                yield (predicted == y).numpy()
        finally:
            stream.close()


def read_top1_correct(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    engine: str = "pytorch",
) -> np.ndarray:
    """:func:`top1_correct`, read by ``engine``: ``"pytorch"``, or ``"onnxruntime"``, where the model is exported to
    ONNX (FP32, with a dynamic batch) and run in ONNX Runtime on the CPU, 64 images a run: the same images in the
    same order, the same FP32 arithmetic up to rounding; or ``"pytorch-bf16"``, PyTorch under bf16 autocast. A
    study reads its baseline and its tables' probes with whichever it measured cheaper when it was created
    (:func:`search.study.sensitivity.scoring_engine`; bf16 only for the probes); on a GPU, always PyTorch."""
    if engine == "onnxruntime" and torch.device(device).type == "cpu":
        onnx_model = export_onnx(model, data.example_input(), dynamic_batch=True)
        return onnx_top1_correct(onnx_model, data, split, limit=limit)
    autocast = torch.bfloat16 if engine == BF16_ENGINE else None
    return top1_correct(model, data, split, limit=limit, device=device, autocast=autocast)


@dataclass(frozen=True)
class Agreement:
    """Two ONNX models run on the same images: each one's top-1 and how often their top-1 agree."""

    top1_a: float
    top1_b: float
    agreement: float
    """Fraction of images on which both models predict the same class."""
    images: int


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
    correct = onnx_top1_correct(
        onnx_model, data, split, threads=threads, batch_size=batch_size, limit=limit, reporter=reporter
    )
    return float(correct.mean())


def onnx_top1_correct(
    onnx_model: bytes,
    data: Dataset,
    split: str = "val",
    *,
    threads: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """Per image of ``split``, in the order :func:`onnx_top1` reads them: is the model's top-1 the true class."""
    hits = list(
        onnx_correct_batches(
            onnx_model, data, split, threads=threads, batch_size=batch_size, limit=limit, reporter=reporter
        )
    )
    if not hits:
        raise ValueError(f"split {split!r} is empty")
    return np.concatenate(hits).astype(bool)


def onnx_correct_batches(
    onnx_model: bytes,
    data: Dataset,
    split: str = "val",
    *,
    threads: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> Iterator[np.ndarray]:
    """:func:`onnx_top1_correct` batch by batch, the same images in the same order: a reader that has seen enough
    closes the iterator and no further image is read."""
    for logits, labels in _logits([onnx_model], data, split, threads, batch_size, limit, reporter):
        yield logits[0].argmax(axis=1) == labels


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
    step = 1 if any(fixed_batch(p) == 1 for p in parsed) else batch_size
    sessions = [open_session(m, threads) for m in models]
    names = [s.get_inputs()[0].name for s in sessions]
    limit = subset_limit(len(data.split(split)), limit)
    total = len(data.split(split)) if limit is None else limit
    with reporter.task(f"ONNX Runtime top-1 on {split}", total) as task:
        for x, y in data.batches(split, batch_size, shuffle=limit is not None, augment=False, limit=limit):
            feed = x.numpy()
            outputs = []
            for session, name in zip(sessions, names, strict=True):
                parts = [session.run(None, {name: feed[i : i + step]})[0] for i in range(0, len(feed), step)]
                outputs.append(np.concatenate(parts))
            yield outputs, y.numpy()
            task.advance(len(y))
