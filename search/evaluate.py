"""Top-1 accuracy of a PyTorch model on a split of a dataset."""

from __future__ import annotations

import torch
from torch import nn

from search.data import Dataset
from search.progress import NullReporter, Reporter

__all__ = ["top1"]


@torch.no_grad()  # not inference_mode: the channels_last copy of the weights must stay trainable
def top1(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> float:
    """Fraction of images in ``split`` whose highest logit is the true class (FP32, eval mode).

    ``limit`` evaluates a fixed random subset of that many images (the same one on every call), so
    a class-sorted split still gives every class its share.
    """
    reporter = reporter or NullReporter()
    model.eval()
    model = model.to(memory_format=torch.channels_last)
    total = len(getattr(data, split))
    if limit is not None:
        total = min(total, limit)
    correct = seen = 0
    with reporter.task(f"top-1 on {split}", total) as task:
        for x, y in data.batches(split, batch_size, shuffle=limit is not None, augment=False, limit=limit):
            logits = model(x.contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
            task.advance(len(y))
    if seen == 0:
        raise ValueError(f"split {split!r} is empty")
    return correct / seen
